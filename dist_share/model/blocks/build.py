"""`build_block`: one weight set of a block, built from its spec by the spec's ``type``.

Five built-in blocks (``mlp``, ``conv2d``, ``embedding``, ``gru``, ``transformer``) and two that
bring a Keras model of your own: ``custom`` (a factory named ``"package.module:function"``,
called with ``args``) and ``keras_application`` (``keras.applications.<name>`` with
``weights=None`` by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from dist_share.model.blocks.custom import build_custom_block
from dist_share.model.blocks.keras_application import KerasApplicationBlock
from dist_share.model.blocks.sequence import SequenceBlock
from dist_share.model.blocks.spec import BUILTIN_BLOCKS, validate_block_spec


def build_block(
    spec: Mapping[str, Any],
    output_dim: int | None = None,
    name: str | None = None,
    path: str = "model.tower.block",
    dtype: Any = None,
) -> keras.layers.Layer:
    """Build one weight set of a block from its spec (the ``block:`` of a tower).

    Args:
        spec: a `BlockSpec`, or plain data that `validate_block_spec` checks first.
        output_dim: width of the final linear projection of a built-in block (None: none).
            ``custom`` and ``keras_application`` blocks end where they end; `SharedTower` adds
            the projection after them.
        name: the layer's name.
        path: the config key path to name in errors.
        dtype: the layer's dtype policy (None: the global one).

    Returns:
        A new layer with fresh weights.

    Raises:
        ConfigError: a bad spec (see `validate_block_spec`), or a ``custom`` factory that
            raises or returns something that is not a Keras layer (path ``<path>.factory``).
    """
    spec = validate_block_spec(spec, path)
    kind, options = spec.type, spec.options
    if kind == "custom":
        return build_custom_block(options["factory"], options["args"], f"{path}.factory")
    kw: dict[str, Any] = {"name": name, "dtype": dtype}
    if kind == "keras_application":
        return KerasApplicationBlock(options["name"], options["args"], options["input_size"], **kw)
    kw["output_dim"] = output_dim
    if kind in ("gru", "transformer"):
        return SequenceBlock(kind=kind, **options, **kw)
    return BUILTIN_BLOCKS[kind][0](**options, **kw)
