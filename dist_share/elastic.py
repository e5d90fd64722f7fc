"""Elastic Horovod for Keras 3: a training state Horovod can commit, roll back and hand to joiners.

Horovod's elastic mode (``horovodrun --min-np --max-np --host-discovery-script``) keeps a job
running while workers come and go: the training function is wrapped in ``hvd.elastic.run``;
the state is committed every few steps; when a worker dies the survivors get a
``HorovodInternalError`` in their next collective, roll back to the last commit and carry on
with fewer workers; when the discovery script lists a new host, every worker gets a
``HostsUpdatedInterrupt`` at its next commit, the new worker is started, and the state is
broadcast from rank 0 so it joins where the others are.

Why not Horovod's own ``hvd.elastic.TensorFlowKerasState`` (0.28.1): it was written for Keras 2.
With Keras 3 (TF 2.16+)

* it reads ``optimizer.variables()`` as a method (Keras 3: a list property) and
  ``model.get_weights()`` covers no optimizer slots, so a rollback would keep the Adam moments
  of the lost steps;
* its ``sync`` calls ``hvd.broadcast_variables(model.variables)``: Keras 3 variables are not
  ``tf.Variable`` s, and Horovod's broadcast needs the underlying ``tf.Variable`` (``v.value``).

`KerasTrainState` is an ``hvd.elastic.ObjectState`` (so plain Python attributes such as
``step`` are committed and broadcast by Horovod's own code) that snapshots and restores every
model and optimizer variable itself and broadcasts the ``tf.Variable`` s underneath.
Everything else (driver, discovery, blacklisting, rendezvous, Gloo) is Horovod's, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _tf_variables(variables: Sequence[Any]) -> list[Any]:
    """The ``tf.Variable`` under each Keras 3 variable (Horovod's ops take only those)."""
    return [getattr(v, "value", v) for v in variables]


def make_state(
    model: Any,
    optimizer: Any,
    extra_variables: Sequence[Any] = (),
    **attributes: Any,
) -> Any:
    """A `KerasTrainState` for ``model`` and ``optimizer`` (built first, so its slots exist).

    Args:
        model: a built Keras 3 model.
        optimizer: a Keras 3 optimizer; built here on the trainable variables if it is not.
        extra_variables: more variables to commit/restore/broadcast (e.g. a step counter).
        **attributes: plain Python values committed with the state (``step=0``, ``epoch=0``).

    Raises:
        ImportError: Horovod is not installed.
    """
    import horovod.tensorflow as hvd

    class KerasTrainState(hvd.elastic.ObjectState):
        """Commit = host copies of every variable; restore = assign them back; sync = broadcast
        from rank 0 (the variables, then Horovod's broadcast of the Python attributes)."""

        def __init__(self) -> None:
            self.model, self.optimizer = model, optimizer
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            self.extra_variables = list(extra_variables)
            self._snapshot: list[np.ndarray] | None = None
            self.commits = 0
            self.restores = 0
            super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank, **attributes)
            self._save_variables()

        def variables(self) -> list[Any]:
            return (
                list(self.model.variables) + list(self.optimizer.variables) + self.extra_variables
            )

        def _save_variables(self) -> None:
            self._snapshot = [np.array(v.numpy(), copy=True) for v in self.variables()]

        def save(self) -> None:
            self._save_variables()
            self.commits += 1
            super().save()

        def restore(self) -> None:
            for v, value in zip(self.variables(), self._snapshot or [], strict=True):
                v.assign(value)
            self.restores += 1
            super().restore()

        def sync(self) -> None:
            hvd.broadcast_variables(_tf_variables(self.variables()), root_rank=0)
            self._save_variables()
            super().sync()

    return KerasTrainState()


def run(train: Callable[..., Any], state: Any, *args: Any, **kwargs: Any) -> Any:
    """``hvd.elastic.run(train)(state, ...)``: call ``train(state, ...)`` until it returns,
    rolling back / re-forming the job whenever workers leave or join.

    ``train`` must rebuild anything that depends on the number of workers (the data shards,
    the per-worker batch) from ``hvd.size()`` each time it is entered, and call
    ``state.commit()`` every few steps (the rollback point, and where joins happen).
    """
    import horovod.tensorflow as hvd

    return hvd.elastic.run(train)(state, *args, **kwargs)
