"""Objectives that return one value per example (shape ``[batch]``).

Per-example values let the distributed trainer divide the sum by the *global* batch size, which
is what makes the result independent of how the batch is split across replicas. Everything is
computed in float32 (mixed precision outputs are cast first).

Each loss is a small registered callable class rather than a `keras.losses.Loss`: Keras wraps a
plain callable with a mean reduction in `model.compile`, while a `Loss` with ``reduction=None``
would be summed there.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
from keras import ops

from dist_share.errors import ConfigError, hint
from dist_share.model.cross_replica import ReplicaGroup, current_group
from dist_share.model.mining import MINING, contrastive_values, triplet_values
from dist_share.model.serialization import register

LOSS_TYPES = (
    "contrastive",
    "triplet",
    "in_batch_softmax",
    "binary",
    "sparse_categorical_crossentropy",
)
# Where an in-batch loss takes its negatives: the whole global batch, or each replica's rows.
NEGATIVES = ("global", "local")
# The logit of a masked candidate: finite, so that a row left without negatives has gradients.
_MASKED = -1e9
# Options that belong to one kind of loss, and why another kind has no use for them.
_FOREIGN_OPTIONS = {
    "negatives": "compares no rows of the batch, so it has no negatives to take "
    "(only in_batch_softmax has)",
    "mining": "has no class labels to mine triplets or pairs with (triplet and contrastive have)",
    "remove_accidental_hits": "compares no candidates of the batch (only in_batch_softmax does)",
    "logq_correction": "compares no candidates of the batch (only in_batch_softmax does)",
    "logq_alpha": "compares no candidates of the batch (only in_batch_softmax does)",
}


def _f32(x: Any) -> Any:
    return ops.cast(x, "float32")


class PerExample:
    """Base: ``__call__(y_true, y_pred) -> [batch]`` float32, with a serialisable config.

    ``couples_rows``: a row's value depends on other rows of the global batch (it gathers them
    across replicas), so micro-batches must be recombined before it is computed.
    ``CHOICES``: the options that take a name, and the names they take (the others are
    booleans or numbers, as their defaults are). ``FRACTIONS``: numbers in (0, 1].
    """

    couples_rows = False
    CHOICES: dict[str, tuple[str, ...]] = {}
    FRACTIONS: tuple[str, ...] = ()

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> PerExample:
        return cls(**config)

    @property
    def __name__(self) -> str:  # Keras names metrics/losses after this
        return type(self).__name__


@register
class ContrastiveLoss(PerExample):
    """``y * d^2 + (1 - y) * max(margin - d, 0)^2`` on a distance ``d``; y=1 means same.

    ``mining: none``: ``y_pred`` is the distance of a given pair ``[B]`` and ``y_true`` says
    whether it matches. ``batch_hard``: ``y_pred`` is embeddings ``[B, D]`` and ``y_true``
    their classes; each row is an anchor paired with its farthest positive and its nearest
    negative in the global batch (`mining.contrastive_values`).
    """

    CHOICES = {"mining": ("none", "batch_hard")}

    def __init__(self, margin: float = 1.0, mining: str = "none") -> None:
        self.margin = float(margin)
        self.mining = str(mining)

    @property
    def couples_rows(self) -> bool:  # type: ignore[override]
        return self.mining != "none"

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        if self.mining != "none":
            return contrastive_values(y_pred, y_true, self.margin)
        y, d = ops.reshape(_f32(y_true), (-1,)), ops.reshape(_f32(y_pred), (-1,))
        return y * ops.square(d) + (1.0 - y) * ops.square(ops.relu(self.margin - d))

    def get_config(self) -> dict:
        return {"margin": self.margin, "mining": self.mining}


@register
class TripletLoss(PerExample):
    """``max(d_ap - d_an + margin, 0)``.

    ``mining: none``: ``y_pred = [B, 2]`` holds (d_ap, d_an) of given triplets; labels unused.
    ``batch_hard`` / ``semi_hard``: ``y_pred`` is embeddings ``[B, D]`` and ``y_true`` their
    classes; each row is an anchor whose positive and negative are chosen in the global batch
    (`mining.triplet_values`).
    """

    CHOICES = {"mining": MINING}

    def __init__(self, margin: float = 1.0, mining: str = "none") -> None:
        self.margin = float(margin)
        self.mining = str(mining)

    @property
    def couples_rows(self) -> bool:  # type: ignore[override]
        return self.mining != "none"

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        if self.mining != "none":
            return triplet_values(y_pred, y_true, self.margin, self.mining)
        d = _f32(y_pred)
        return ops.relu(d[:, 0] - d[:, 1] + self.margin)

    def get_config(self) -> dict:
        return {"margin": self.margin, "mining": self.mining}


def pair_logits(y_pred: Any) -> Any:
    """Logits ``[B]`` from either a score ``[B]`` or a stacked (query, candidate) ``[B, 2, D]``."""
    p = _f32(y_pred)
    if len(p.shape) == 3:
        return ops.sum(p[:, 0] * p[:, 1], axis=-1)
    return ops.reshape(p, (-1,))


@register
class BinaryLoss(PerExample):
    """Sigmoid cross-entropy on logits (a score, or the dot product of a stacked pair)."""

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        y = ops.reshape(_f32(y_true), (-1,))
        return ops.binary_crossentropy(y, pair_logits(y_pred), from_logits=True)


@register
class InBatchSoftmaxLoss(PerExample):
    """Softmax over the global batch's candidates: row i's positive is candidate i.

    ``y_pred`` is ``[B, 2, D]`` (query, candidate). Every row is a positive pair and every other
    row's candidate a negative. With ``negatives: global`` (the default) the candidates of every
    replica are gathered (`cross_replica.current_group`), so a query sees the same negatives
    however the global batch is split; ``local`` keeps each replica's own rows only
    (per-replica negatives, which change with the number of replicas).

    With either correction, ``y_true`` holds each row's candidate id ([B] integers):
    ``remove_accidental_hits`` masks, for each row, every other candidate of the global batch
    with its positive's id (TFRS's RemoveAccidentalHits); ``logq_correction`` subtracts from
    each logit the log of its candidate's probability of being in a batch, estimated by the
    model's `sampling.CandidateFrequency` (Yi et al. 2019), which the two-tower family binds to
    ``frequency`` when it builds the model.
    """

    couples_rows = True
    CHOICES = {"negatives": NEGATIVES}
    FRACTIONS = ("logq_alpha",)

    def __init__(
        self,
        temperature: float = 0.1,
        negatives: str = "global",
        remove_accidental_hits: bool = False,
        logq_correction: bool = False,
        logq_alpha: float = 0.01,
    ) -> None:
        self.temperature = float(temperature)
        self.negatives = str(negatives)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.logq_correction = bool(logq_correction)
        self.logq_alpha = float(logq_alpha)
        self.frequency: Any = None  # a CandidateFrequency layer of the model

    @property
    def uses_ids(self) -> bool:
        """Whether ``y_true`` must hold the candidate ids."""
        return self.remove_accidental_hits or self.logq_correction

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        p = _f32(y_pred)
        queries, candidates = p[:, 0], p[:, 1]
        group = current_group() if self.negatives == "global" else ReplicaGroup()
        everyone, _ = group.gather_rows(candidates)
        logits = ops.matmul(queries / self.temperature, ops.transpose(everyone))
        # Row i's own logit, from its own pair: its position among the gathered candidates
        # is not needed, and it stays when its column is masked below.
        own = ops.sum(queries / self.temperature * candidates, axis=-1)
        if not self.uses_ids:
            return ops.logsumexp(logits, axis=1) - own
        ids = ops.reshape(ops.cast(y_true, "int64"), (-1,))
        all_ids = group.gather_values(ids)
        log_q = None
        if self.logq_correction:
            if self.frequency is None:
                raise ValueError(
                    "logq_correction needs the model's CandidateFrequency layer bound to "
                    "the loss's `frequency` (the two-tower family binds it)"
                )
            log_q = self.frequency.log_probability(all_ids)
            own = own - self.frequency.log_probability(ids)
        hits = (ids, all_ids) if self.remove_accidental_hits else None
        return _corrected_logsumexp(logits, own, log_q, hits) - own

    def get_config(self) -> dict:
        return {
            "temperature": self.temperature,
            "negatives": self.negatives,
            "remove_accidental_hits": self.remove_accidental_hits,
            "logq_correction": self.logq_correction,
            "logq_alpha": self.logq_alpha,
        }


@tf.function(jit_compile=True)
def _corrected_logsumexp(logits: Any, own: Any, log_q: Any, hits: Any) -> Any:
    """Per row, the logsumexp of the corrected logits: minus each candidate's ``log_q``
    (unless None), and with ``hits = (ids, all_ids)`` every column holding the row's item
    masked (its own included) and its own logit ``own`` added back.

    XLA fuses the correction, the comparison, the select and the reductions into one pass over
    ``[rows, candidates]`` each way, where TensorFlow's ops would each make one. Pure
    computation: the collectives stay outside.
    """
    if log_q is not None:
        logits = logits - log_q[None, :]
    if hits is None:
        return tf.reduce_logsumexp(logits, axis=1)
    ids, all_ids = hits
    others = tf.where(tf.equal(ids[:, None], all_ids[None, :]), _MASKED, logits)
    return tf.reduce_logsumexp(tf.stack([tf.reduce_logsumexp(others, axis=1), own], 1), axis=1)


@register
class SparseCrossEntropyLoss(PerExample):
    """Sparse categorical cross-entropy on logits ``[B, C]`` with integer labels ``[B]``."""

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        y = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        return ops.sparse_categorical_crossentropy(y, _f32(y_pred), from_logits=True)


# The class of each loss type. Its options and their defaults are the class's constructor
# arguments: one place, read by `loss_options` (and so by the config's validation and dumps).
_LOSS_CLASSES: dict[str, type[PerExample]] = {
    "contrastive": ContrastiveLoss,
    "triplet": TripletLoss,
    "in_batch_softmax": InBatchSoftmaxLoss,
    "binary": BinaryLoss,
    "sparse_categorical_crossentropy": SparseCrossEntropyLoss,
}


def loss_options(kind: str) -> dict[str, Any]:
    """The options of loss type `kind` with their defaults, e.g. ``{"margin": 1.0}``."""
    params = inspect.signature(_LOSS_CLASSES[kind].__init__).parameters
    return {
        name: p.default
        for name, p in params.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


def validate_loss_spec(
    spec: Any, family_losses: Sequence[str] | None = None, path: str = "model.loss"
) -> dict:
    """Check a loss spec and return it with every option's default filled in.

    Args:
        spec: ``{"type": "contrastive", "margin": 0.5}`` or a bare type name.
        family_losses: the types that fit the model family (None: any type).
        path: the config key path to name in errors.

    Returns:
        A new dict: ``type`` and every option of that type.

    Raises:
        ConfigError: not a mapping or name, an unknown type, a type that does not fit the
            family, an unknown option, or an option that is not a positive number.
    """
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(path, f"must be a loss name or a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type")
    allowed = tuple(family_losses) if family_losses is not None else LOSS_TYPES
    if kind not in LOSS_TYPES:
        raise ConfigError(
            f"{path}.type", f"unknown loss {kind!r}; expected one of {', '.join(allowed)}"
        )
    if kind not in allowed:
        raise ConfigError(
            f"{path}.type",
            f"loss {kind!r} does not fit this model; expected one of {', '.join(allowed)}",
        )
    options = loss_options(kind)
    cls = _LOSS_CLASSES[kind]
    out: dict[str, Any] = {"type": kind}
    for key, value in spec.items():
        if key == "type":
            continue
        if key in _FOREIGN_OPTIONS and key not in options:
            raise ConfigError(f"{path}.{key}", f"loss {kind!r} {_FOREIGN_OPTIONS[key]}")
        if key not in options:
            raise ConfigError(
                f"{path}.{key}",
                f"unknown option for loss {kind!r}" + hint(key, ("type", *options), "allowed"),
            )
        if key in cls.CHOICES:
            if value not in cls.CHOICES[key]:
                raise ConfigError(
                    f"{path}.{key}",
                    f"got {value!r}, expected one of {', '.join(cls.CHOICES[key])}",
                )
        elif isinstance(options[key], bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}.{key}", f"must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{path}.{key}", f"must be a number > 0, got {value!r}")
        elif key in cls.FRACTIONS and value > 1:
            raise ConfigError(f"{path}.{key}", f"must be a number in (0, 1], got {value!r}")
    for key, default in options.items():
        value = spec.get(key, default)
        out[key] = value if isinstance(default, (bool, str)) else float(value)
    return out


def get_loss(spec: Any, path: str = "model.loss") -> PerExample:
    """A per-example loss from its spec: ``{type: contrastive, margin: 1.0}`` or a bare name.

    Args:
        spec: a loss spec (see `validate_loss_spec`, which checks it).
        path: the config key path to name in errors.

    Raises:
        ConfigError: see `validate_loss_spec`.
    """
    checked = validate_loss_spec(spec, path=path)
    kind = checked.pop("type")
    return _LOSS_CLASSES[kind](**checked)
