"""The ``keras_application`` block: a ``keras.applications`` model as a tower block."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras

from dist_share.errors import ConfigError
from dist_share.model.serialization import register


@register
class KerasApplicationBlock(keras.layers.Layer):
    """A ``keras.applications`` model as a tower block, created when the input shape is known.

    The application is built in ``build`` with ``input_shape`` set to the stream's per-example
    shape (resized first to ``input_size`` when given: the applications need at least 32x32),
    ``include_top=False`` and ``pooling="avg"`` unless ``args`` says otherwise, and
    ``weights=None`` unless ``args`` names weights (which then need the network to download).

    Args:
        name_of_application: the function's name in ``keras.applications``, e.g.
            ``MobileNetV3Small``.
        args: further keyword arguments for it (plain data).
        input_size: ``[height, width]`` to resize each image to first, or None.
        **kwargs: `keras.layers.Layer` arguments.

    Raises:
        ConfigError: an unknown application (path ``model.tower.block.name``).
    """

    def __init__(
        self,
        name_of_application: str,
        args: Mapping[str, Any] | None = None,
        input_size: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.name_of_application = check_application_name(
            name_of_application, "model.tower.block.name"
        )
        self.args = dict(args or {})
        self.input_size = [int(v) for v in input_size] if input_size else None
        self.resize = (
            keras.layers.Resizing(*self.input_size, name="resize", dtype=self.dtype_policy)
            if self.input_size
            else None
        )
        self.application = None

    def build(self, input_shape: Any) -> None:
        shape = tuple(input_shape[1:])
        if self.resize is not None:
            self.resize.build(tuple(input_shape))
            shape = (*self.input_size, shape[-1])
        kwargs = {"include_top": False, "pooling": "avg", "weights": None, **self.args}
        kwargs["input_shape"] = shape
        build = getattr(keras.applications, self.name_of_application)
        self.application = build(**kwargs)

    def call(self, inputs: Any, training: Any = None) -> Any:
        x = self.resize(inputs) if self.resize is not None else inputs
        return self.application(x, training=training)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        if self.application is None:
            self.build(input_shape)
        shape = tuple(input_shape)
        if self.input_size:
            shape = (shape[0], *self.input_size, shape[-1])
        return tuple(self.application.compute_output_shape(shape))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            name_of_application=self.name_of_application,
            args=dict(self.args),
            input_size=self.input_size,
        )
        return config


def check_application_name(name: Any, path: str) -> str:
    """`name` itself if ``keras.applications`` has a model of that name, else a ConfigError."""
    known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
    if not isinstance(name, str) or name not in known:
        raise ConfigError(
            path,
            f"unknown Keras application {name!r}; expected one of keras.applications' "
            f"models, e.g. MobileNetV3Small, ResNet50 ({len(known)} in all)",
        )
    return name
