"""The ``custom`` block: a Keras layer or model made by a ``"package.module:function"`` factory."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import keras

from dist_share.errors import ConfigError


def resolve_factory(ref: Any, path: str = "model.tower.block.factory") -> Callable[..., Any]:
    """Import the callable that ``"package.module:function"`` names.

    Args:
        ref: ``"module:attribute"`` (the attribute may be dotted: ``module:Class.method``).
        path: the config key path to name in errors.

    Returns:
        The callable.

    Raises:
        ConfigError: `ref` is not of that form, the module does not import, it has no such
            attribute, or the attribute is not callable. Each says which.
    """
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(path, f"must be 'package.module:function' (one colon), got {ref!r}")
    module_name, attribute = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or an error raised by the module's own code
        raise ConfigError(
            path,
            f"cannot import module {module_name!r}: {type(err).__name__}: {err} (is it on "
            "PYTHONPATH, or installed in this environment?)",
        ) from err
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_"))
            raise ConfigError(
                path,
                f"module {module_name!r} has no attribute {attribute!r}; it defines "
                f"{', '.join(public[:12]) or 'nothing public'}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            path,
            f"{ref!r} is not callable (it is a {type(obj).__name__}); name a function or class that "
            "returns a Keras layer or model",
        )
    return obj


def build_custom_block(
    factory_ref: str, args: Mapping[str, Any], path: str = "model.tower.block.factory"
) -> keras.layers.Layer:
    """Call the factory ``"package.module:function"`` with `args` and check it made a layer.

    Raises:
        ConfigError: the factory does not resolve (see `resolve_factory`), raises, or returns
            something that is not a Keras layer (path `path`).
    """
    factory = resolve_factory(factory_ref, path)
    try:
        layer = factory(**args)
    except Exception as err:
        raise ConfigError(
            path,
            f"{factory_ref}(**{args!r}) raised {type(err).__name__}: {err}",
        ) from err
    if not isinstance(layer, keras.layers.Layer):
        raise ConfigError(
            path,
            f"{factory_ref} returned a {type(layer).__name__}, not a Keras layer or "
            "model; it must return a new keras.layers.Layer (or keras.Model) on every call",
        )
    return layer
