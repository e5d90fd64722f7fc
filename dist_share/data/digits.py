"""scikit-learn's bundled 8x8 digits, split into train/eval images, and the draws families make from them."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from dist_share.data.types import SPLITS, split_rng

if TYPE_CHECKING:
    from dist_share.config.schema import DataConfig


@functools.lru_cache(maxsize=4)
def _digits_split(split_seed: int, eval_fraction: float) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # [n, 8, 8, 1] in [0, 1]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_eval = int(round(len(labels) * eval_fraction))
    ev, tr = order[:n_eval], order[n_eval:]
    return images[tr], labels[tr], images[ev], labels[ev]


def digits_with_labels(
    data: DataConfig, split: str, salt: int
) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """The split's digit images and classes, and the generator a family draws examples with."""
    tr_x, tr_y, ev_x, ev_y = _digits_split(int(data.split_seed), float(data.eval_fraction))
    images, labels = (tr_x, tr_y) if split == "train" else (ev_x, ev_y)
    return images, labels, split_rng(data.split_seed, salt, SPLITS.index(split))


def digits_for(
    data: DataConfig, split: str, salt: int
) -> tuple[np.ndarray, list[np.ndarray], np.random.Generator]:
    """Like `digits_with_labels`, with the image indices of each class instead of the labels."""
    images, labels, rng = digits_with_labels(data, split, salt)
    return images, [np.flatnonzero(labels == c) for c in range(10)], rng


def same_class(rng, by_class, classes: np.ndarray) -> np.ndarray:
    """One random image index of class ``classes[i]`` for every i."""
    out = np.empty(len(classes), np.int64)
    for c, members in enumerate(by_class):
        mask = classes == c
        out[mask] = rng.choice(members, int(mask.sum()))
    return out


def other_class(rng, classes: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """A class different from ``classes[i]`` for every i, uniformly."""
    return (classes + rng.integers(1, num_classes, len(classes))) % num_classes


def corrupt(
    rng, images: np.ndarray, max_shift: int, noise_std: float, occlusion: int
) -> np.ndarray:
    """One "sensor" view: a random shift (zero fill), a random occluded square, Gaussian noise."""
    n, h, w, _ = images.shape
    out = np.zeros_like(images)
    dy = rng.integers(-max_shift, max_shift + 1, n)
    dx = rng.integers(-max_shift, max_shift + 1, n)
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    for sy in range(-max_shift, max_shift + 1):
        for sx in range(-max_shift, max_shift + 1):
            m = (dy == sy) & (dx == sx)
            y0, x0 = max_shift - sy, max_shift - sx
            out[m] = padded[m, y0 : y0 + h, x0 : x0 + w]
    if occlusion:
        r0 = rng.integers(0, h - occlusion + 1, n)[:, None, None]
        c0 = rng.integers(0, w - occlusion + 1, n)[:, None, None]
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        hole = (rows >= r0) & (rows < r0 + occlusion) & (cols >= c0) & (cols < c0 + occlusion)
        out[hole] = 0.0
    out += rng.normal(0.0, noise_std, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)
