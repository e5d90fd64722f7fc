"""XLA for each replica's forward and backward pass: whether it is on, and the compiled pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from dist_share.distribute.strategies import Strategy
from dist_share.errors import ConfigError
from dist_share.model import cross_replica

OFF, ON, TRY = "off", "on", "try"


def jit_mode(setting: str, strategy: Strategy) -> str:
    """What ``training.jit_compile`` means for this process: ``off``, ``on`` (a collective in
    the pass is an error) or ``try`` (``auto`` on a GPU: a pass holding a collective is left
    uncompiled). ``auto`` leaves XLA off on CPUs, where it rarely pays for its compile time,
    and under Horovod, whose collectives and fusion buffers it cannot see."""
    if setting == "true":
        return ON
    if setting == "false" or strategy.gradient_backend == "horovod":
        return OFF
    return TRY if tf.config.list_logical_devices("GPU") else OFF


class ReplicaPass:
    """``fn`` (a replica's loss and gradients), compiled with XLA per `jit_mode`.

    One compiled function per replica: a tf.distribute replica's variables live on its own
    device, and a compiled function is placed whole on one. Collectives (the gradient
    all-reduce, the optimizer's update) stay outside the pass; a batch-coupled model's
    collectives are inside it, which `cross_replica.compiled_pass` catches while tracing.
    """

    def __init__(self, fn: Callable[..., Any], mode: str, log: Callable[[str], None]) -> None:
        self.fn, self.mode, self.log = fn, mode, log
        self._compiled: dict[int, Any] = {}
        self.compiled = mode != OFF  # until a trace finds it cannot be
        self._reason = ""  # why not, as the collective said it (tracing adds its traceback)

    def __call__(self, *args: Any) -> Any:
        if not self.compiled:
            return self.fn(*args)
        replica = _replica_index()
        compiled = self._compiled.get(replica)
        if compiled is None:
            compiled = self._compiled[replica] = tf.function(self._traced, jit_compile=True)
        try:
            return compiled(*args)
        except cross_replica.CollectiveInCompiledPass:
            pass
        except RuntimeError as e:
            # tf.distribute's own synchronisation (a Keras BatchNormalization(synchronized=True),
            # a replica-context all-reduce) cannot be traced inside a nested function either.
            if "merge_call" not in str(e):
                raise
            self._reason = "the pass synchronises the replicas through tf.distribute (merge_call)"
        if self.mode == ON:
            # Out of the step's trace, where the loop turns it into `error()`.
            raise cross_replica.CollectiveInCompiledPass(self._reason)
        self.compiled = False
        self.log(f"XLA left off: {self._reason}")
        return self.fn(*args)

    def error(self) -> ConfigError:
        """What ``jit_compile: true`` on a pass that holds a collective is (a ConfigError cannot
        be raised through a trace: tracing rebuilds exceptions from their message)."""
        return ConfigError(
            "training.jit_compile",
            f"XLA cannot compile this model's replica pass: {self._reason}; "
            "set training.jit_compile: auto or false",
        )

    def _traced(self, *args: Any) -> Any:
        with cross_replica.compiled_pass():
            try:
                return self.fn(*args)
            except cross_replica.CollectiveInCompiledPass as e:
                self._reason = str(e.args[0]).splitlines()[0]
                raise


def _replica_index() -> int:
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    index = tf.get_static_value(context.replica_id_in_sync_group)
    return int(index) if index is not None else 0
