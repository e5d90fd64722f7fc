"""Block specs as plain data: the types, `BlockSpec`, and the checks of a spec and of its input.

`validate_block_spec` checks a spec once and returns a frozen `BlockSpec` with every default
filled in (the defaults are the block classes' constructor defaults); `check_block_input`
checks that a stream's shape and dtype can feed the block.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dist_share.errors import ConfigError, hint
from dist_share.model.blocks.conv2d import Conv2DBlock
from dist_share.model.blocks.custom import resolve_factory
from dist_share.model.blocks.dense import MLPBlock
from dist_share.model.blocks.embedding import COMBINERS, EmbeddingBlock
from dist_share.model.blocks.head import as_list
from dist_share.model.blocks.keras_application import check_application_name
from dist_share.model.blocks.norm import NORMS
from dist_share.model.blocks.sequence import SequenceBlock

BUILTIN_BLOCK_TYPES = ("mlp", "conv2d", "embedding", "gru", "transformer")
USER_BLOCK_TYPES = ("custom", "keras_application")
BLOCK_TYPES = BUILTIN_BLOCK_TYPES + USER_BLOCK_TYPES


class BlockSpec(Mapping):
    """A checked block spec: the block ``type`` and its options, immutable.

    It reads like the mapping it came from (``spec["type"]``, ``dict(spec)``); functions that
    take a spec skip the check when they get a `BlockSpec`, so a spec is checked once however
    many weight sets are built from it. Make one with `validate_block_spec`.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_data", dict(data))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("BlockSpec is immutable; build a new one with validate_block_spec")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"BlockSpec({self._data!r})"

    def __reduce__(self) -> tuple:  # copy, deepcopy and pickle rebuild it through __init__
        return (BlockSpec, (self._data,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._data) == dict(other)

    __hash__ = None  # type: ignore[assignment]  # holds lists: not hashable, like a dict

    @property
    def type(self) -> str:
        return self._data["type"]

    @property
    def options(self) -> dict:
        """The keys besides ``type``, as a new dict."""
        return {k: v for k, v in self._data.items() if k != "type"}

    def to_dict(self) -> dict:
        """Plain data (for YAML dumps and `get_config`)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._data.items()}


# The class each built-in type builds, and the keys of its YAML spec (besides `type`). The
# defaults of the keys are the class's constructor defaults: one place.
BUILTIN_BLOCKS: dict[str, tuple[type, tuple[str, ...]]] = {
    "mlp": (MLPBlock, ("units", "activation", "norm", "norm_sync")),
    "conv2d": (
        Conv2DBlock,
        ("filters", "kernel_size", "pool_size", "norm", "norm_sync", "activation", "dense"),
    ),
    "embedding": (
        EmbeddingBlock,
        ("vocab_size", "embedding_dim", "combiner", "units", "activation"),
    ),
    "gru": (SequenceBlock, ("units",)),
    "transformer": (SequenceBlock, ("units", "num_heads")),
}
_USER_KEYS = {"custom": ("factory", "args"), "keras_application": ("name", "args", "input_size")}


def block_keys(kind: str) -> tuple[str, ...]:
    """The keys a block of type `kind` accepts besides ``type``."""
    return BUILTIN_BLOCKS[kind][1] if kind in BUILTIN_BLOCKS else _USER_KEYS[kind]


def _defaults(kind: str) -> dict:
    cls, keys = BUILTIN_BLOCKS[kind]
    params = inspect.signature(cls.__init__).parameters
    return {k: params[k].default for k in keys if params[k].default is not inspect.Parameter.empty}


def _positive_int(value: Any, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(path, f"must be a positive integer, got {value!r}")
    return value


def _positive_ints(value: Any, path: str) -> list[int]:
    return [_positive_int(v, f"{path}[{i}]") for i, v in enumerate(as_list(value))]


def validate_block_spec(spec: Any, path: str = "model.tower.block") -> BlockSpec:
    """Check a block spec and return it normalised, with every default filled in.

    Args:
        spec: plain data, e.g. ``{"type": "conv2d", "filters": [16, 32]}``, or a `BlockSpec`
            (returned as it is: it was checked when it was made).
        path: the config key path to name in errors.

    Returns:
        A `BlockSpec`. Built-in types get all their keys (the block class's defaults for the
        missing ones; ``norm_sync`` only with ``norm: batch``); ``custom`` gets ``args: {}``;
        ``keras_application`` gets ``args: {}`` and ``input_size: null``.

    Raises:
        ConfigError: not a mapping, an unknown type or key, a bad value (``norm``, sizes that
            must be positive integers, an embedding without ``vocab_size``, ``norm_sync`` on a
            block whose ``norm`` is not ``batch``, ...), a ``custom``
            factory that does not import, is missing or is not callable (path
            ``<path>.factory``), an unknown Keras application (``<path>.name``).
    """
    if isinstance(spec, BlockSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(path, f"must be a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type")
    if kind not in BLOCK_TYPES:
        raise ConfigError(
            f"{path}.type", f"unknown block type {kind!r}; expected one of {', '.join(BLOCK_TYPES)}"
        )
    allowed = block_keys(kind)
    for key in spec:
        if key != "type" and key not in allowed:
            raise ConfigError(
                f"{path}.{key}", f"unknown key for a {kind} block" + hint(key, ("type", *allowed))
            )
    if kind in USER_BLOCK_TYPES:
        return _validate_user_spec(kind, spec, path)
    out = {"type": kind, **_defaults(kind), **{k: v for k, v in spec.items() if k != "type"}}
    if out.get("norm") not in NORMS:
        raise ConfigError(
            f"{path}.norm", f"unknown norm {out.get('norm')!r}; expected one of {NORMS}"
        )
    if "norm_sync" in out:
        _check_norm_sync(out, "norm_sync" in spec, f"{path}.norm_sync")
    if kind == "embedding":
        if "vocab_size" not in spec:
            raise ConfigError(
                f"{path}.vocab_size", "an embedding block needs a positive vocab_size"
            )
        _positive_int(out["vocab_size"], f"{path}.vocab_size")
        _positive_int(out["embedding_dim"], f"{path}.embedding_dim")
        if out["combiner"] not in COMBINERS:
            raise ConfigError(
                f"{path}.combiner", f"got {out['combiner']!r}, expected one of {COMBINERS}"
            )
    for key in ("filters", "dense"):
        if key in out:
            out[key] = _positive_ints(out[key], f"{path}.{key}")
    if kind in ("gru", "transformer"):
        units = _positive_ints(out["units"], f"{path}.units")
        if len(units) != 1:
            raise ConfigError(f"{path}.units", f"a {kind} block has one width, got {units}")
        out["units"] = units[0]
        if kind == "transformer":
            _positive_int(out["num_heads"], f"{path}.num_heads")
    elif "units" in out:
        out["units"] = _positive_ints(out["units"], f"{path}.units")
    if kind == "conv2d":
        _positive_int(out["kernel_size"], f"{path}.kernel_size")
        if out["pool_size"] is not None:
            _positive_int(out["pool_size"], f"{path}.pool_size")
    return BlockSpec(out)


def _check_norm_sync(out: dict, given: bool, path: str) -> None:
    """``norm_sync`` is a bool, and only a block with ``norm: batch`` has it (filled in there)."""
    if out["norm"] != "batch":
        if given:
            norm = "none" if out["norm"] in (None, "none") else repr(out["norm"])
            raise ConfigError(
                path,
                f"only norm: batch has batch statistics to synchronise (norm is {norm})",
            )
        del out["norm_sync"]
    elif not isinstance(out["norm_sync"], bool):
        raise ConfigError(path, f"must be true or false, got {out['norm_sync']!r}")


def _validate_user_spec(kind: str, spec: Mapping[str, Any], path: str) -> BlockSpec:
    args = spec.get("args") or {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise ConfigError(f"{path}.args", f"must be a mapping of keyword arguments, got {args!r}")
    if kind == "custom":
        if "factory" not in spec:
            raise ConfigError(
                f"{path}.factory", "a custom block needs factory: 'package.module:function'"
            )
        resolve_factory(spec["factory"], f"{path}.factory")
        return BlockSpec({"type": kind, "factory": spec["factory"], "args": dict(args)})
    if "name" not in spec:
        raise ConfigError(f"{path}.name", "a keras_application block needs a name, e.g. ResNet50")
    name = check_application_name(spec["name"], f"{path}.name")
    if "input_shape" in args:
        raise ConfigError(
            f"{path}.args.input_shape",
            "is set from the stream's shape; resize with input_size: [height, width] instead",
        )
    size = spec.get("input_size")
    if size is not None:
        size = _positive_ints(size, f"{path}.input_size")
        if len(size) != 2:
            raise ConfigError(f"{path}.input_size", f"must be [height, width], got {size}")
    return BlockSpec({"type": kind, "name": name, "args": dict(args), "input_size": size})


def check_block_input(
    spec: Mapping[str, Any], shape: Sequence[int | None], dtype: str, where: str
) -> None:
    """Check that a stream's per-example shape and dtype can feed the block.

    Args:
        spec: the block spec (plain data or `BlockSpec`).
        shape: the per-example shape (no batch axis).
        dtype: the stream's dtype name.
        where: names the stream (and key path) in errors.

    Raises:
        ConfigError: the block cannot take that input. ``custom`` blocks are not checked here
            (the layer itself raises when it is built on the stream).
    """
    kind = spec.get("type")
    shape = tuple(shape)
    is_int = "int" in str(dtype)
    if kind == "custom":
        return
    if kind == "embedding":
        if not is_int:
            raise ConfigError(where, f"an embedding block needs integer ids, got dtype {dtype}")
        if len(shape) > 1:
            raise ConfigError(
                where, f"an embedding block needs shape [] or [fields], got {list(shape)}"
            )
        return
    if is_int:
        raise ConfigError(where, f"a {kind} block needs float input, got dtype {dtype}")
    if any(d is None for d in shape):
        raise ConfigError(where, f"a {kind} block needs a fully known shape, got {list(shape)}")
    if kind == "keras_application":
        if len(shape) != 3:
            raise ConfigError(
                where,
                f"a Keras application needs shape [height, width, channels], got {list(shape)}",
            )
        size = spec.get("input_size") or shape[:2]
        if min(size) < 32:
            raise ConfigError(
                where,
                f"images of {shape[0]}x{shape[1]} are too small for the Keras applications "
                "(at least 32x32); add input_size: [32, 32] to the block to resize them",
            )
    elif kind == "conv2d":
        if len(shape) != 3:
            raise ConfigError(
                where, f"a conv2d block needs shape [height, width, channels], got {list(shape)}"
            )
        pool = spec.get("pool_size", 2) or 1
        h, w = shape[0], shape[1]
        for i, _ in enumerate(as_list(spec.get("filters", [16, 32]))):
            h, w = h // pool, w // pool
            if h < 1 or w < 1:
                raise ConfigError(
                    where,
                    f"shape {list(shape)} is too small for the conv2d block: pooling by {pool} "
                    f"after conv {i} leaves no pixels",
                )
    elif kind in ("gru", "transformer"):
        if len(shape) != 2:
            raise ConfigError(
                where, f"a {kind} block needs shape [time, features], got {list(shape)}"
            )
    elif kind == "mlp" and len(shape) < 1:
        raise ConfigError(where, "an mlp block needs at least one feature axis, got a scalar")
