"""The public checks that config validation reuses: each argument checked by the code that uses it.

`blocks.spec.validate_block_spec`, `towers.validate_tower_layout` / `validate_groups` and
`losses.validate_loss_spec` return normalised values with the defaults filled in (the defaults
are the constructors' own) and raise `ConfigError` naming the key path they are given.
"""

from __future__ import annotations

import pytest

from dist_share.errors import ConfigError
from dist_share.model import losses
from dist_share.model.blocks.build import build_block
from dist_share.model.blocks.spec import BlockSpec, validate_block_spec
from dist_share.model.towers import validate_tower_layout


def test_block_spec_is_normalised_once_and_immutable() -> None:
    spec = validate_block_spec({"type": "conv2d", "filters": [8]}, "model.tower.block")
    assert isinstance(spec, BlockSpec)
    assert spec.to_dict() == {
        "type": "conv2d",
        "filters": [8],
        "kernel_size": 3,
        "pool_size": 2,
        "norm": None,
        "activation": "relu",
        "dense": [],
    }
    assert validate_block_spec(spec) is spec, "a BlockSpec is not checked again"
    with pytest.raises(AttributeError):
        spec.extra = 1
    assert build_block(spec, output_dim=3).filters == [8]
    gru = validate_block_spec({"type": "gru", "units": [7]})
    assert gru["units"] == 7
    with pytest.raises(ConfigError) as err:
        validate_block_spec({"type": "gru", "units": [7, 8]}, "model.query.block")
    assert err.value.path == "model.query.block.units"


@pytest.mark.parametrize(
    ("sharing", "groups", "path"),
    [
        ("mirror", None, "model.tower.sharing"),
        ("grouped", None, "model.tower.groups"),
        ("grouped", [[0, 1], [1, 2]], "model.tower.groups[1]"),
        ("grouped", [[0], [1]], "model.tower.groups"),
        ("shared", [[0, 1, 2]], "model.tower.groups"),
    ],
)
def test_tower_layout_errors_name_the_key(sharing, groups, path) -> None:
    with pytest.raises(ConfigError) as err:
        validate_tower_layout(sharing, groups, 3, "model.tower")
    assert err.value.path == path


def test_tower_layout_normalises() -> None:
    assert validate_tower_layout("grouped", [(2, 0), [1]], 3) == ("grouped", [[2, 0], [1]])
    assert validate_tower_layout("switchable", None, 2) == ("switchable", None)


def test_loss_spec_defaults_come_from_the_loss_classes() -> None:
    assert losses.validate_loss_spec("contrastive") == {
        "type": "contrastive",
        "margin": 1.0,
        "mining": "none",
    }
    assert losses.validate_loss_spec({"type": "in_batch_softmax", "temperature": 0.5}) == {
        "type": "in_batch_softmax",
        "temperature": 0.5,
        "negatives": "global",
        "remove_accidental_hits": False,
        "logq_correction": False,
        "logq_alpha": 0.01,
    }
    assert losses.loss_options("triplet") == {"margin": 1.0, "mining": "none"}
    assert losses.get_loss({"type": "triplet", "margin": 2}).margin == 2.0


@pytest.mark.parametrize(
    ("spec", "family", "path", "match"),
    [
        ({"type": "hinge"}, None, "model.loss.type", "unknown loss"),
        ({"type": "triplet"}, ("contrastive",), "model.loss.type", "does not fit"),
        ({"type": "contrastive", "temperature": 1}, None, "model.loss.temperature", "allowed"),
        ({"type": "contrastive", "margin": -1}, None, "model.loss.margin", "> 0"),
        (3, None, "model.loss", "mapping"),
    ],
)
def test_loss_spec_errors_name_the_key(spec, family, path, match) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        losses.validate_loss_spec(spec, family, "model.loss")
    assert err.value.path == path
