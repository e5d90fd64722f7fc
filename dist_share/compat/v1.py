"""Shared weights in TF1 graph-mode code: ``tf.compat.v1`` variable scopes done right.

Classic TF1 code shares a weight set across inputs by calling the same layer function under
the same ``variable_scope`` with ``reuse``. These helpers do exactly that, so existing graph
code (placeholders, sessions, ``hvd.DistributedOptimizer`` around a v1 optimizer) can share
towers without rewriting it to Keras; docs/MIGRATION.md maps each helper to the TF2 API.

The conditional case is the one that goes wrong in hand-written code: calling ``get_variable``
inside a ``tf.cond`` branch creates the variable inside the cond's control-flow context, and its
initializer then fails or is skipped. `switchable_tower` creates every weight set *once, outside*
the cond; the branches only read them, and the untaken branch's variables get zero gradient.

Everything here builds graph ops; call it with eager execution disabled or inside a
``tf.Graph().as_default()`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

v1 = tf.compat.v1


class LayerParams(NamedTuple):
    """The variables of one dense or convolution layer: ``kernel`` and ``bias``."""

    kernel: Any
    bias: Any


def dense_params(scope: str, in_dim: int, units: int, reuse: Any = v1.AUTO_REUSE) -> LayerParams:
    """Create (or reuse) ``scope/kernel`` and ``scope/bias`` with ``get_variable``."""
    with v1.variable_scope(scope, reuse=reuse):
        kernel = v1.get_variable(
            "kernel", [in_dim, units], initializer=v1.glorot_uniform_initializer()
        )
        bias = v1.get_variable("bias", [units], initializer=v1.zeros_initializer())
    return LayerParams(kernel, bias)


def dense(x: Any, params: LayerParams, activation: Callable | None = None) -> Any:
    y = tf.matmul(x, params.kernel) + params.bias
    return activation(y) if activation else y


def conv2d_params(
    scope: str, in_channels: int, filters: int, kernel_size: int, reuse: Any = v1.AUTO_REUSE
) -> LayerParams:
    """Create (or reuse) an HWIO conv kernel and bias under `scope`."""
    with v1.variable_scope(scope, reuse=reuse):
        kernel = v1.get_variable(
            "kernel",
            [kernel_size, kernel_size, in_channels, filters],
            initializer=v1.glorot_uniform_initializer(),
        )
        bias = v1.get_variable("bias", [filters], initializer=v1.zeros_initializer())
    return LayerParams(kernel, bias)


def conv2d(
    x: Any,
    params: LayerParams,
    strides: int = 1,
    padding: str = "SAME",
    activation: Callable | None = None,
) -> Any:
    y = tf.nn.conv2d(x, params.kernel, strides=strides, padding=padding) + params.bias
    return activation(y) if activation else y


def shared_dense(
    inputs: Sequence[Any], units: int, scope: str, activation: Callable | None = None
) -> list:
    """The classic pattern: the first input creates ``scope/*``, the others reuse it."""
    outs = []
    for i, x in enumerate(inputs):
        params = dense_params(scope, int(x.shape[-1]), units, reuse=i > 0)
        outs.append(dense(x, params, activation))
    return outs


def shared_conv2d(
    inputs: Sequence[Any],
    filters: int,
    kernel_size: int,
    scope: str,
    activation: Callable | None = None,
    padding: str = "SAME",
) -> list:
    """Like `shared_dense`, for a 2-D convolution over NHWC inputs."""
    outs = []
    for i, x in enumerate(inputs):
        params = conv2d_params(scope, int(x.shape[-1]), filters, kernel_size, reuse=i > 0)
        outs.append(conv2d(x, params, padding=padding, activation=activation))
    return outs


def shared_tower(inputs: Sequence[Any], tower_fn: Callable[[Any], Any], scope: str) -> list:
    """Apply an arbitrary ``get_variable``-based `tower_fn` to each input with one weight set.

    `tower_fn` creates its variables with ``get_variable`` (e.g. via `dense_params`, which uses
    AUTO_REUSE) ; the outer scope is entered with ``reuse=True`` after the first input, so a
    tower_fn that forgets AUTO_REUSE still shares instead of failing or duplicating.
    """
    outs = []
    for i, x in enumerate(inputs):
        with v1.variable_scope(scope, reuse=True if i > 0 else v1.AUTO_REUSE):
            outs.append(tower_fn(x))
    return outs


def switchable_tower(
    inputs: Sequence[Any],
    use_shared: Any,
    make_params: Callable[[str, Any], Any],
    apply: Callable[[Any, Any], Any],
    scope: str,
) -> list:
    """Shared weights or per-stream weights, chosen at run time by a boolean tensor.

    ``make_params(scope, x)`` creates a weight set (with ``get_variable``) for an input like `x`;
    ``apply(x, params)`` computes with it. Weight sets ``scope/shared`` and ``scope/stream_i`` are
    all created here, before and outside the ``tf.cond``; `use_shared` (e.g. a bool placeholder
    with a default) selects which set each branch reads. Both branches return all streams.
    """
    shared = make_params(f"{scope}/shared", inputs[0])
    own = [make_params(f"{scope}/stream_{i}", x) for i, x in enumerate(inputs)]

    def shared_branch() -> list:
        return [apply(x, shared) for x in inputs]

    def separate_branch() -> list:
        return [apply(x, p) for x, p in zip(inputs, own, strict=True)]

    return list(tf.cond(use_shared, shared_branch, separate_branch))


def mlp_params(scope: str, in_dim: int, units: Sequence[int]) -> list[LayerParams]:
    """A stack of dense weight sets ``scope/dense_0``, ``scope/dense_1``, ..."""
    params = []
    for i, u in enumerate(units):
        params.append(dense_params(f"{scope}/dense_{i}", in_dim, u))
        in_dim = u
    return params


def mlp(x: Any, params: Sequence[LayerParams], activation: Callable = tf.nn.relu) -> Any:
    """Dense stack; no activation after the last layer (it is the embedding)."""
    for i, p in enumerate(params):
        x = dense(x, p, activation if i < len(params) - 1 else None)
    return x
