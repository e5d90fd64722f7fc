"""All weight sets of a `separate` / `grouped` tower in one batched op per layer.

A tower with N weight sets of the same MLP block runs N small matmuls per layer one after
another. Stacking the N kernels into one ``[N, in, out]`` tensor and the N sets' inputs into
``[N, rows, in]`` turns them into one batched matmul over the set axis: one kernel launch
instead of N, which is what pays on an accelerator. On CPU it does not: TensorFlow 2.21's
batched matmul and its gradient ran at 0.3-0.9x of the N separate matmuls (which the executor
already runs in parallel) in benchmarks/bench_batched_sets.py, so `SharedTower` only uses this
path when asked (``batch_sets=True``).

The variables stay exactly what they are (one Dense kernel and bias per set, same names and
shapes): they are stacked *in the call*, so checkpoints written with or without batching are
interchangeable, and each set's gradient is the slice of the stacked gradient that belongs to
it (`tf.stack`'s gradient is an unstack). Outputs and gradients equal the one-set-after-another
computation up to float rounding (tests/model/test_batched_sets.py).

What can be batched: MLP blocks without normalisation (batch norm keeps per-set statistics
and moving averages; layer norm would be batchable but is not done yet), every set seeing the
same number of rows (``separate``: one stream each; ``grouped``: groups of equal size) of the
same per-example shape. Anything else falls back to one set after another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keras import ops

from dist_share.model.blocks.dense import MLPBlock


def can_batch(blocks: Sequence[Any], streams_per_set: Sequence[Sequence[int]]) -> bool:
    """True when `blocks` (one per weight set) can run as one batched op per layer.

    Args:
        blocks: the weight sets, built.
        streams_per_set: for each set, the streams that go through it.
    """
    if len(blocks) < 2 or not all(type(b) is MLPBlock for b in blocks):
        return False
    if any(b.norm not in (None, "none") or b.head_norms for b in blocks):
        return False
    if len({len(s) for s in streams_per_set}) != 1:
        return False
    first = blocks[0]
    for b in blocks:
        if len(b.head_dense) != len(first.head_dense) or (b.projection is None) != (
            first.projection is None
        ):
            return False
        if b.activation != first.activation or not b.built:
            return False
        for layer in (*b.head_dense, b.projection):
            if layer is None:
                continue
            if layer.activation is not None and layer.activation.__name__ != "linear":
                return False
    return True


def _layers(block: MLPBlock) -> list[Any]:
    return [*block.head_dense, *([block.projection] if block.projection is not None else [])]


def apply_batched(blocks: Sequence[MLPBlock], inputs: Any) -> Any:
    """Run set i on ``inputs[i]``, batched; returns ``[N, rows, units]``, row i equal to
    ``blocks[i](inputs[i])``.

    Args:
        inputs: ``[N, rows, ...]``, or a list of N ``[rows, ...]`` tensors (stacked here).
    """
    first = blocks[0]
    x = ops.stack(inputs, axis=0) if isinstance(inputs, (list, tuple)) else inputs
    flat = math.prod(int(d) for d in x.shape[2:])
    x = ops.reshape(x, (len(blocks), -1, flat))
    n_dense = len(first.head_dense)
    for j, layer in enumerate(_layers(first)):
        dtype = layer.compute_dtype
        x = ops.cast(x, dtype)
        kernel = ops.stack([ops.cast(_layers(b)[j].kernel, dtype) for b in blocks], axis=0)
        x = ops.matmul(x, kernel)  # batched: [N, rows, in] @ [N, in, out]
        if layer.use_bias:
            bias = ops.stack([ops.cast(_layers(b)[j].bias, dtype) for b in blocks], axis=0)
            x = x + bias[:, None, :]
        if j < n_dense and first.head_act is not None:
            x = first.head_act(x)
    return x
