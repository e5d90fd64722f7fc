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

from dist_share.errors import DataError

BINARY_LABELS = ("siamese", "two_tower")
CLASS_LABELS = ("multiview",)


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


def check_labels(
    path: str | Path, labels: np.ndarray, family: str, num_classes: int | None = None
) -> None:
    """Labels must be numbers in the family's range (see the module docstring).

    Raises:
        DataError: no examples, non-numeric labels, NaN, a label outside {0, 1} for siamese/two_tower,
            or a non-integer / negative / >= ``num_classes`` class for multiview.
    """
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise DataError(
            f"{path}: 'labels' has dtype {labels.dtype}; expected numbers "
            + (
                "(1 = same / relevant, 0 = different / not)"
                if family in BINARY_LABELS
                else "(integer classes)"
            )
        )
    if len(labels) == 0:
        raise DataError(f"{path} holds no examples ('labels' is empty)")
    if labels.ndim != 1:
        raise DataError(
            f"{path}: 'labels' has shape {labels.shape}; expected one label per example [n]"
        )
    values = labels.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(
            f"{path}: 'labels' holds NaN/infinite values in {_where(~np.isfinite(values))}"
        )
    if family in BINARY_LABELS:
        bad = (values != 0) & (values != 1)
        if bad.any():
            found = np.unique(values[bad])[:5].tolist()
            raise DataError(
                f"{path}: 'labels' must be 0 or 1 for the {family} family "
                f"(1 = same / relevant), but {_where(bad)} hold other values, e.g. {found}"
            )
    elif family in CLASS_LABELS:
        bad = (values != np.round(values)) | (values < 0)
        if num_classes is not None:
            bad |= values >= num_classes
        if bad.any():
            found = np.unique(values[bad])[:5].tolist()
            top = f"{num_classes - 1}" if num_classes is not None else "num_classes - 1"
            raise DataError(
                f"{path}: 'labels' must be integer classes 0..{top} for the {family} family "
                f"(model.num_classes), but {_where(bad)} hold other values, e.g. {found}"
            )
