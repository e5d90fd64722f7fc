"""Checks on user-supplied arrays (``.npz`` files) before any training: a bad value is named
with its file, stream and first offending example instead of surfacing as a NumPy traceback,
a negative loss, or NaN at step 1.

What each family's labels mean (docs/ARCHITECTURE.md, data contract):

* ``siamese`` and ``two_tower``: 1 for a matching pair / relevant item, 0 otherwise;
* ``multiview``: an integer class in ``[0, model.num_classes)``;
* ``triplet``: unused (any numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_share.errors import ConfigError, DataError


def _where(mask: np.ndarray) -> str:
    """'3 examples, the first at index 17' for a boolean mask over examples."""
    bad = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1)) if mask.ndim else np.array([0])
    return f"{len(bad)} example(s), the first at index {int(bad[0])}"


def check_stream(path: str | Path, name: str, array: np.ndarray) -> None:
    """A feature stream must be numeric and, if floating point, finite.

    Raises:
        DataError: strings/objects, or NaN/inf values (naming the file, stream and example).
    """
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(
            f"{path}: stream {name!r} has dtype {array.dtype} ({array.dtype.kind!r}); expected "
            "numbers (float features or integer ids)"
        )
    if np.issubdtype(array.dtype, np.floating) and array.size:
        finite = np.isfinite(array)
        if not finite.all():
            kind = "NaN" if np.isnan(array).any() else "infinite"
            raise DataError(
                f"{path}: stream {name!r} holds {kind} values in {_where(~finite)}; "
                "clean or drop those examples"
            )


def check_binary_labels(labels: np.ndarray, where: str, family: str) -> None:
    """Labels of a pair/relevance family: numbers, 0 or 1.

    Raises:
        ConfigError: at ``where``, naming how many labels are wrong and the first one's index.
    """
    values = _numeric_labels(labels, where, "0 or 1: 1 = same / relevant, 0 = different / not")
    bad = (values != 0) & (values != 1)
    if bad.any():
        found = np.unique(values[bad])[:5].tolist()
        raise ConfigError(
            where,
            f"'labels' must be 0 or 1 for the {family} family (1 = same / relevant), but "
            f"{_where(bad)} hold other values, e.g. {found}",
        )


def check_class_labels(
    labels: np.ndarray, where: str, family: str, num_classes: int | None = None
) -> None:
    """Labels of a classification family: integer classes in ``[0, num_classes)``.

    Raises:
        ConfigError: at ``where``, naming how many labels are wrong and the first one's index.
    """
    values = _numeric_labels(labels, where, "integer classes")
    bad = (values != np.round(values)) | (values < 0)
    if num_classes is not None:
        bad |= values >= num_classes
    if bad.any():
        found = np.unique(values[bad])[:5].tolist()
        top = f"{num_classes - 1}" if num_classes is not None else "num_classes - 1"
        raise ConfigError(
            where,
            f"'labels' must be integer classes 0..{top} for the {family} family "
            f"(model.num_classes), but {_where(bad)} hold other values, e.g. {found}",
        )


def check_item_classes(labels: np.ndarray, where: str) -> None:
    """Labels of single items whose pairs or triplets are mined in the batch: integer classes.

    Raises:
        ConfigError: at ``where``, saying that mining needs class labels and which are not.
    """
    values = _numeric_labels(labels, where, "integer classes, which model.loss.mining needs")
    bad = (values != np.round(values)) | (values < 0)
    if bad.any():
        found = np.unique(values[bad])[:5].tolist()
        raise ConfigError(
            where,
            f"model.loss.mining needs each row's class, but 'labels' are not integer classes "
            f"(>= 0): {_where(bad)} hold other values, e.g. {found}",
        )
    if len(np.unique(values)) < 2:
        raise ConfigError(
            where,
            "model.loss.mining needs rows of at least two classes to find negatives, "
            f"but every label is {values[0]:g}",
        )


def _numeric_labels(labels: np.ndarray, where: str, meaning: str) -> np.ndarray:
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise ConfigError(where, f"'labels' has dtype {labels.dtype}; expected numbers ({meaning})")
    if labels.ndim != 1:
        raise ConfigError(
            where, f"'labels' has shape {labels.shape}; expected one label per example [n]"
        )
    values = labels.astype(np.float64)
    if not np.isfinite(values).all():
        raise ConfigError(
            where, f"'labels' holds NaN/infinite values in {_where(~np.isfinite(values))}"
        )
    return values
