"""`MetricsLogger`: what a run shows and keeps (metrics.jsonl, TensorBoard, the console)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorflow.core.framework import summary_pb2

from dist_share.files import atomic_write_text

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()
# The tag under which TensorBoard's HParams dashboard looks for a run's hyperparameters.
_HPARAMS_TAG = "_hparams_/session_start_info"

HParam = bool | int | float | str


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, HParam]:
    """A nested config as HParams: dotted keys, and values TensorBoard can show (booleans,
    numbers, strings; lists and None as their YAML-like text)."""
    out: dict[str, HParam] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _hparams_metadata(hparams: Mapping[str, HParam]) -> bytes:
    """The HParams plugin's session-start record (the event `hp.hparams` writes), built from its
    protos alone: the plugin's summary module would import TensorBoard's TensorFlow shim."""
    info = plugin_data_pb2.SessionStartInfo(
        group_name=hashlib.sha256(
            json.dumps(dict(hparams), sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest(),
        start_time_secs=time.time(),
    )
    for name in sorted(hparams):
        value = hparams[name]
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[name].number_value = value
        else:
            info.hparams[name].string_value = value
    content = plugin_data_pb2.HParamsPluginData(version=0, session_start_info=info)
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name="hparams", content=content.SerializeToString()
        )
    ).SerializeToString()


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or Infinity; strict parsers reject Python's bare tokens, so they become null."""
    return value if math.isfinite(value) else None


class MetricsLogger:
    """What a run shows and keeps: metrics.jsonl, TensorBoard, and the console. Chief only.

    On a terminal the console gets Keras's progress bar; anywhere else (a Slurm output file,
    ``kubectl logs``) one plain line per logging interval, since a bar's carriage-return frames
    would fill the file. Lines carry the rank when ``rank`` is given.

    Args:
        run_dir: where metrics.jsonl and tensorboard/ go; None: console only.
        is_chief: only the chief writes anything.
        total_steps: the run's length, for the progress bar and the ETA.
        tensorboard: write TensorBoard scalars.
        progress: show progress on the console.
        stream: the console (default sys.stdout); decides between the bar and plain lines.
        rank: shown at the start of each console line.
        hparams: the run's settings, for TensorBoard's HParams dashboard (`flat_hparams`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None,
        is_chief: bool,
        total_steps: int,
        tensorboard: bool = True,
        progress: bool = True,
        stream: Any = None,
        rank: int | None = None,
        hparams: Mapping[str, HParam] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_chief = is_chief
        self.total_steps = total_steps
        self.tensorboard = tensorboard
        self.progress = progress and is_chief
        self.stream = stream if stream is not None else sys.stdout
        self.prefix = f"[rank {rank}] " if rank is not None else ""
        self.hparams = dict(hparams or {})
        self._graph_written = False
        self._file = None
        self._writer = None
        self._opened = False
        self._bar: keras.utils.Progbar | None = None
        self._t_start = 0.0
        self._step_start = 0

    def open(self, start_step: int, resume: bool = True) -> None:
        """Start (or continue) the run's logs at ``start_step``; later calls do nothing.

        With ``resume``, records of steps after ``start_step`` were written by a run that died
        before its next checkpoint; they are dropped, so that metrics.jsonl holds each step once.
        """
        if self._opened:
            return
        self._opened = True
        self._t_start, self._step_start = time.perf_counter(), start_step
        if not self.is_chief or self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume and path.exists():
            self._drop_records_after(path, start_step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        if self.tensorboard:
            self._writer = tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))
            if self.hparams:
                with self._writer.as_default():
                    tf.summary.write(
                        _HPARAMS_TAG,
                        tf.zeros([0]),
                        step=0,
                        metadata=_hparams_metadata(self.hparams),
                    )

    @staticmethod
    def _drop_records_after(path: Path, step: int) -> None:
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    @property
    def is_tty(self) -> bool:
        """The console is a terminal: progress is a bar, not plain lines."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def log(self, split: str, step: int, values: Mapping[str, float]) -> None:
        """Append one record to metrics.jsonl and TensorBoard (and, for eval, the console)."""
        if not self.is_chief:
            return
        if split != "train" and self.progress and not self.is_tty:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            print(f"{self.prefix}{split} step {step}: {shown}", file=self.stream, flush=True)
        if self._file is None:
            return
        record: dict[str, Any] = {"split": split, "step": int(step), "time": time.time()}
        record.update({k: _finite_or_none(float(v)) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            with self._writer.as_default():
                for k, v in values.items():
                    # The scalar plugin's metadata written by hand gives TensorBoard the
                    # event tf.summary.scalar writes, without importing the tensorboard
                    # package into every training process.
                    tf.summary.write(
                        f"{split}/{k}", tf.constant(float(v)), step=step, metadata=_SCALAR_METADATA
                    )

    def log_graph(self, graph: tf.Graph) -> None:
        """The training step's graph, for TensorBoard's Graphs tab (once per run)."""
        if self._writer is None or self._graph_written:
            return
        self._graph_written = True
        with self._writer.as_default():
            tf.summary.graph(graph)

    def note(self, line: str) -> None:
        """One line on the chief's console, whatever the progress settings."""
        if self.is_chief:
            print(f"{self.prefix}{line}", file=self.stream, flush=True)

    def show_progress(self, step: int, logs: Mapping[str, float], interval_end: bool) -> None:
        """The console: the bar on every update, a plain line at the end of each interval."""
        if not self.progress:
            return
        if self.is_tty:
            if self._bar is None:
                self._bar = keras.utils.Progbar(
                    self.total_steps, stateful_metrics=["comm_bytes_per_step"]
                )
                self._bar.update(self._step_start)
            self._bar.update(step, values=list(logs.items()))
            return
        if not interval_end:
            return
        elapsed = time.perf_counter() - self._t_start
        done = step - self._step_start
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        shown = " ".join(
            f"{k}={v:.4g}" for k, v in logs.items() if k not in ("comm_bytes_per_step",)
        )
        print(
            f"{self.prefix}step {step}/{self.total_steps} {shown} eta={eta:.0f}s",
            file=self.stream,
            flush=True,
        )

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._opened = False
        self._bar = None
