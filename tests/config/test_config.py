"""Config loading, defaults, overrides and the error messages users see."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dist_share.config.loading import diff, dump
from dist_share.config.schema import FAMILIES, SECTIONS, TrainingConfig
from dist_share.errors import ConfigError
from dist_share.families.registry import get_family
from dist_share.model.blocks.spec import BlockSpec, validate_block_spec
from dist_share.run.resolve import load_config, replace, validate
from tests.helpers.paths import CONFIGS

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value


def test_the_four_families_ship_a_config() -> None:
    names = {p.stem for p in CONFIG_FILES}
    assert {"siamese_digits", "triplet_digits", "multiview_digits", "two_tower_synthetic"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_shipped_config_validates_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert list(cfg.to_dict()) == list(SECTIONS)
    assert cfg.data.family == cfg.model.family
    # The saved (dumped) resolved config loads back to exactly the same config.
    assert validate(yaml.safe_load(dump(cfg))) == cfg


def test_defaults_are_filled_from_a_minimal_config() -> None:
    cfg = validate({"model": {"family": "siamese"}})
    assert cfg.training.batch_size == 64
    assert cfg.to_dict()["strategy"] == {
        "name": "local",
        "num_cpu_devices": None,
        "gpu_memory_growth": True,
        "allow_shared_gpus": False,
        "cross_device_ops": "auto",
        "prefetch_to_device": True,
        "horovod": {
            "compression": "none",
            "op": "average",
            "grouped_allreduce": True,
            "sparse_as_dense": False,
            "elastic": False,
            "commit_every": 10,
        },
        "sparse": {"dedup": True, "dense_threshold": 0.5, "dense_switch": "measured"},
    }
    assert cfg.model.tower.block["type"] == "conv2d"
    assert cfg.model.loss == {"type": "contrastive", "margin": 1.0, "mining": "none"}
    assert cfg.data.source == "digits"
    tt = validate({"model": {"family": "two_tower"}})
    assert tt.data.source == "two_tower_synthetic"
    assert "tower" not in tt.to_dict()["model"] and "head" not in tt.to_dict()["model"]
    assert tt.model.tables["items"].vocab_size == 2000


def test_a_users_block_replaces_the_default_block_instead_of_merging() -> None:
    cfg = validate(
        {
            "model": {"family": "siamese", "tower": {"block": {"type": "mlp", "units": [8]}}},
            "data": {"source": "random", "random": {"image_shape": [4]}},
        }
    )
    block = cfg.model.tower.block
    assert block == validate_block_spec({"type": "mlp", "units": [8]})
    assert block["units"] == [8] and "filters" not in block  # nothing of the default conv2d
    assert isinstance(block, BlockSpec)  # checked once, here, and kept


def test_overrides_are_yaml_values_at_dotted_paths(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: {family: siamese}\n")
    cfg = load_config(
        path,
        [
            "training.steps=3",
            "optimizer.learning_rate=1e-3",  # YAML 1.1 reads this as a string; accepted as a number
            "model.tower.block.filters=[4, 8]",
            "strategy.horovod.compression=fp16",
            "strategy.horovod.elastic=true",
            "strategy.horovod.commit_every=5",
            "logging.tensorboard=false",
            "logging.slow_rank_margin=0.5",
        ],
    )
    assert cfg.strategy.horovod.elastic is True and cfg.strategy.horovod.commit_every == 5
    assert cfg.training.steps == 3
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
    assert cfg.model.tower.block["filters"] == [4, 8]
    assert cfg.strategy.horovod.compression == "fp16"
    assert cfg.logging.tensorboard is False and cfg.logging.slow_rank_margin == 0.5
    assert replace(cfg, "training.steps=9").training.steps == 9


def test_override_errors_name_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: {family: siamese}\n")
    with pytest.raises(ConfigError, match=r"--set.*KEY.PATH=VALUE"):
        load_config(path, ["training.steps"])
    with pytest.raises(ConfigError) as info:
        load_config(path, ["training.steps.x=1"])
    assert info.value.path == "training.steps"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["training.stpes=3"])
    assert info.value.path == "training.stpes" and "did you mean 'steps'" in str(info.value)


@pytest.mark.parametrize(
    "raw, path, words",
    [
        (
            {"model": {"family": "siamese"}, "training": {"batch_size": "abc"}},
            "training.batch_size",
            ["'abc'", "integer"],
        ),
        (
            {"model": {"family": "siamese"}, "training": {"batch_size": -8}},
            "training.batch_size",
            ["-8", "> 0"],
        ),
        (
            {"model": {"family": "siamese"}, "training": {"batch_size": True}},
            "training.batch_size",
            ["True", "integer"],
        ),
        (
            {"model": {"family": "siamese"}, "optimizer": {"learning_rate": "fast"}},
            "optimizer.learning_rate",
            ["'fast'", "number"],
        ),
        (
            {"model": {"family": "siamese"}, "trainig": {}},
            "trainig",
            ["unknown key", "did you mean 'training'"],
        ),
        (
            {"model": {"family": "siamese", "tower": {"sharng": "shared"}}},
            "model.tower.sharng",
            ["did you mean 'sharing'"],
        ),
        (
            {"model": {"family": "siamese", "tower": {"sharing": "share"}}},
            "model.tower.sharing",
            ["'share'", "shared"],
        ),
        (
            {"model": {"family": "siamese"}, "logging": {"slow_rank_margin": -0.1}},
            "logging.slow_rank_margin",
            ["-0.1", ">= 0"],
        ),
        ({"model": {}}, "model.family", ["required", "siamese"]),
        ({"data": {}}, "model", ["required"]),
        (
            {"model": {"family": "pairs"}},
            "model.family",
            ["'pairs'", "siamese, triplet, multiview, two_tower"],
        ),
        (
            {"model": {"family": "siamese"}, "strategy": {"name": "horovd"}},
            "strategy.name",
            ["did you mean 'horovod'"],
        ),
        ({"model": {"family": "siamese", "head": "dot"}}, "model.head", ["'dot'", "l2, cosine"]),
        (
            {"model": {"family": "siamese", "head_threshold": "best"}},
            "model.head_threshold",
            ["'best'", "half_margin, calibrated"],
        ),
        (
            {"model": {"family": "triplet", "head_threshold": "calibrated"}},
            "model.head_threshold",
            ["unknown key"],
        ),
        (
            {
                "model": {
                    "family": "siamese",
                    "head_threshold": "calibrated",
                    "loss": {"type": "contrastive", "mining": "batch_hard"},
                }
            },
            "model.head_threshold",
            ["single items"],
        ),
        (
            {"model": {"family": "siamese", "loss": {"type": "triplet"}}},
            "model.loss.type",
            ["'triplet'", "contrastive"],
        ),
        (
            {"model": {"family": "siamese", "loss": {"type": "contrastive", "margn": 1}}},
            "model.loss.margn",
            ["did you mean 'margin'"],
        ),
        (
            {"model": {"family": "siamese", "tower": {"block": {"type": "conv2d", "filter": [8]}}}},
            "model.tower.block.filter",
            ["did you mean 'filters'"],
        ),
        (
            {"model": {"family": "siamese", "tower": {"block": {"type": "resnet"}}}},
            "model.tower.block.type",
            ["'resnet'", "conv2d"],
        ),
        (
            {"model": {"family": "siamese"}, "data": {"source": "two_tower_synthetic"}},
            "data.source",
            ["two_tower_synthetic", "digits"],
        ),
        (
            {"model": {"family": "siamese"}, "data": {"source": "npz"}},
            "data.train_path",
            ["required"],
        ),
        (
            {"model": {"family": "siamese"}, "data": {"family": "triplet"}},
            "data.family",
            ["triplet", "siamese"],
        ),
        (
            {"model": {"family": "siamese"}, "strategy": {"horovod": {"commit_every": 0}}},
            "strategy.horovod.commit_every",
            ["0"],
        ),
        (
            {"model": {"family": "siamese"}, "training": {"batch_size": 64, "grad_accum_steps": 3}},
            "training.grad_accum_steps",
            ["3", "64"],
        ),
        (
            {
                "model": {
                    "family": "two_tower",
                    "tables": {"users": {"vocab_size": 10}, "items": {"vocab_size": 2000}},
                }
            },
            "model.tables.users.vocab_size",
            ["10", "data.synthetic.num_users"],
        ),
        (
            {"model": {"family": "two_tower", "query": {"features": {"query_usr": "users"}}}},
            "model.query.features.query_usr",
            ["did you mean 'query_user'"],
        ),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_was_expected(
    raw: dict, path: str, words: list[str]
) -> None:
    err = _error(raw)
    assert err.path == path, str(err)
    for word in words:
        assert word in str(err), str(err)


def test_stream_count_mismatch_in_grouped_sharing_names_the_streams() -> None:
    raw = {
        "model": {
            "family": "multiview",
            "tower": {"sharing": "grouped", "groups": [[0, 1], [2, 3]]},
        },
        "data": {"num_views": 3},
    }
    err = _error(raw)
    assert err.path.startswith("model.tower.groups")
    assert "view0" in str(err) and "view2" in str(err)
    raw["data"]["num_views"] = 4
    assert validate(raw).model.tower.groups == [[0, 1], [2, 3]]


def test_unparsable_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  family: siamese\ntraining: {steps: 3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_base_configs_merge_and_cycles_are_reported(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "model: {family: siamese, embedding_dim: 16}\ntraining: {steps: 10, batch_size: 32}\n",
        "base.yaml",
    )
    child = _write(tmp_path, "base: base.yaml\ntraining: {steps: 20}\n", "child.yaml")
    cfg = load_config(child)
    assert (cfg.model.embedding_dim, cfg.training.steps, cfg.training.batch_size) == (16, 20, 32)
    _write(tmp_path, "base: b.yaml\n", "a.yaml")
    _write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_diff_lists_changed_key_paths() -> None:
    a = validate({"model": {"family": "siamese"}})
    b = validate({"model": {"family": "siamese"}, "training": {"steps": 7}})
    assert diff(a.to_dict(), b.to_dict()) == ["training.steps: 600 -> 7"]


def test_the_config_is_frozen_and_typed() -> None:
    cfg = validate({"model": {"family": "siamese"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.steps = 3  # type: ignore[misc]
    assert isinstance(cfg.training, TrainingConfig)
    assert get_family(cfg.data.family).streams(cfg.data) == ["left", "right"]


def test_family_registry_answers_for_config_data_and_models() -> None:
    """One object per family: its streams, losses and heads are asked, never re-listed."""

    assert FAMILIES == ("siamese", "triplet", "multiview", "two_tower")
    for name in FAMILIES:
        fam = get_family(name)
        cfg = validate({"model": {"family": name}})
        assert cfg.model.loss["type"] == fam.losses[0]
        assert cfg.data.source == fam.sources[0]
        assert set(cfg.to_dict()["model"]) == set(fam.model_keys)
    with pytest.raises(ConfigError, match="did you mean 'siamese'"):
        get_family("siames")


@pytest.mark.parametrize(
    ("profile", "key", "says"),
    [
        ({"start_step": 600, "steps": 5}, "training.profile.start_step", "past the end"),
        ({"start_step": 598, "steps": 5}, "training.profile.steps", "ends at step 603"),
        ({"start_step": 10, "steps": -1}, "training.profile.steps", ">= 0"),
        ({"start_step": -3, "steps": 2}, "training.profile.start_step", ">= 0"),
        ({"steps": 2, "horovod_timeline": True}, "training.profile.horovod_timeline", "'local'"),
    ],
)
def test_a_bad_profiler_window_is_one_line_naming_its_key(
    profile: dict, key: str, says: str
) -> None:
    error = _error({"model": {"family": "siamese"}, "training": {"profile": profile}})
    assert error.path == key and says in str(error) and "\n" not in str(error)


def test_the_profiler_is_off_unless_a_window_is_asked_for() -> None:
    window = validate({"model": {"family": "siamese"}}).training.profile
    assert (window.start_step, window.steps, window.horovod_timeline) == (0, 0, False)


def test_precision_and_its_older_spelling() -> None:
    def training(**keys: object) -> TrainingConfig:
        return validate({"model": {"family": "siamese"}, "training": keys}).training

    assert training().precision == "float32" and not training().loss_scaled
    assert training(mixed_precision=True).precision == "mixed_float16"
    assert training(mixed_precision=True).loss_scaled
    assert training(mixed_precision=False).precision == "float32"
    bf16 = training(precision="mixed_bfloat16", mixed_precision=False)
    assert bf16.precision == "mixed_bfloat16" and not bf16.loss_scaled
    # A saved run's config carries the new key only, and reads back the same.
    cfg = validate({"model": {"family": "siamese"}, "training": {"mixed_precision": True}})
    assert "mixed_precision" not in cfg.to_dict()["training"]
    assert validate(cfg.to_dict()) == cfg
    e = _error(
        {
            "model": {"family": "siamese"},
            "training": {"mixed_precision": True, "precision": "mixed_bfloat16"},
        }
    )
    assert e.path == "training.mixed_precision" and "set only training.precision" in str(e)
    e = _error({"model": {"family": "siamese"}, "training": {"precision": "half"}})
    assert e.path == "training.precision" and "mixed_bfloat16" in str(e)


@pytest.mark.parametrize(("given", "read"), [(True, "true"), (False, "false"), ("auto", "auto")])
def test_jit_compile_reads_yaml_booleans(given: object, read: str) -> None:
    cfg = validate({"model": {"family": "siamese"}, "training": {"jit_compile": given}})
    assert cfg.training.jit_compile == read


@pytest.mark.parametrize(
    ("strategy", "training", "path", "words"),
    [
        (
            {"name": "horovod", "cross_device_ops": "nccl"},
            {},
            "strategy.cross_device_ops",
            "only auto",
        ),
        (
            {"name": "multiworker", "cross_device_ops": "hierarchical_copy"},
            {},
            "strategy.cross_device_ops",
            "auto, nccl",
        ),
        (
            {"name": "mirrored", "cross_device_ops": "ring"},
            {},
            "strategy.cross_device_ops",
            "expected one of",
        ),
        (
            {"name": "horovod"},
            {"loop": "keras_fit", "jit_compile": True},
            "training.jit_compile",
            "loop: custom",
        ),
        (
            {"name": "horovod"},
            {"loop": "keras_fit", "mixed_precision": True},
            "training.precision",
            "mixed_bfloat16",
        ),
    ],
)
def test_options_a_strategy_lacks_are_one_line_naming_the_key(
    strategy: dict, training: dict, path: str, words: str
) -> None:
    e = _error({"model": {"family": "siamese"}, "strategy": strategy, "training": training})
    assert e.path == path and words in str(e) and "\n" not in str(e)


def test_every_strategy_takes_its_cross_device_ops() -> None:
    for name, ops in [
        ("mirrored", "auto"),
        ("mirrored", "nccl"),
        ("mirrored", "hierarchical_copy"),
        ("mirrored", "reduction_to_one_device"),
        ("multiworker", "nccl"),
        ("local", "auto"),
    ]:
        cfg = validate(
            {"model": {"family": "siamese"}, "strategy": {"name": name, "cross_device_ops": ops}}
        )
        assert cfg.strategy.cross_device_ops == ops
