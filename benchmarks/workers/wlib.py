"""What the benchmark workers share: thread settings, the benchmark config, a timed Trainer.

Workers are separate processes because thread counts and logical devices must be fixed before
TensorFlow starts, and because Horovod / multi-worker jobs need several processes anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dist_share.run.inputs import input_specs, make_dataset_fn


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--family", default="siamese")
    p.add_argument("--batch", type=int, default=64, help="GLOBAL batch size")
    p.add_argument("--block", type=int, default=50, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks after warm-up")
    p.add_argument("--warmup", type=int, default=1, help="blocks discarded (tracing, caches)")
    p.add_argument("--intra", type=int, default=None, help="TF intra-op threads (None: TF default)")
    p.add_argument("--inter", type=int, default=None, help="TF inter-op threads (None: TF default)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    return p


def setup_threads(intra: int | None, inter: int | None) -> dict[str, Any]:
    """Pin TF's thread pools before the runtime starts; returns what was set, for the record."""
    import tensorflow as tf

    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    return {"intra_op": intra or "default", "inter_op": inter or "default"}


def bench_config(
    family: str, batch: int, steps: int, strategy: dict, overrides: Sequence[str] = ()
) -> dict:
    """A resolved dist_share config for the benchmark model (the project defaults otherwise)."""
    from dist_share.config.loading import apply_overrides
    from dist_share.run.resolve import validate

    raw = {
        "model": {"family": family},
        "training": {"batch_size": batch, "steps": steps, "log_every": 50, "eval_every": 0},
        "strategy": strategy,
        "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    return validate(apply_overrides(raw, overrides))


def make_timed_trainer(block: int, between: Callable[[], None] | None = None) -> Callable[..., Any]:
    """A Trainer factory whose loop's ``train_step`` hook timestamps every `block` steps.

    Window i is the wall time from the start of step i*block to the start of step (i+1)*block,
    so it includes everything the loop does around its steps (progress bar, logging, step
    counter, checkpoints). Process CPU time is recorded as well: on a shared machine it is much
    less disturbed by other processes than wall time. `between`, if given, runs between
    windows (untimed by the trainer): that is where the overhead benchmark interleaves the
    hand-written loop. With ``training.steps_per_loop`` k, a window starts at the first call
    that begins at or after a multiple of `block` steps (make `block` a multiple of k).
    """
    from dist_share.train.loops.custom import CustomLoop
    from dist_share.train.trainer import Trainer

    class TimedLoop(CustomLoop):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.windows: list[float] = []
            self.cpu_windows: list[float] = []
            self._count = 0
            self._t0 = self._c0 = 0.0

        def train_step(self, iterator: Any, num_steps: int = 1) -> dict[str, float]:
            now, cpu = time.perf_counter(), time.process_time()
            if self._count and self._count % block == 0:
                self.windows.append(now - self._t0)
                self.cpu_windows.append(cpu - self._c0)
                if between is not None:
                    between()
                now, cpu = time.perf_counter(), time.process_time()
            if self._count % block == 0:
                self._t0, self._c0 = now, cpu
            self._count += num_steps
            return super().train_step(iterator, num_steps)

    def make(*args: Any, **kwargs: Any) -> Trainer:
        return Trainer(*args, loop=TimedLoop, **kwargs)

    return make


def model_and_data(cfg: Any, batch: int) -> tuple[Callable[[], Any], Callable[..., Any]]:
    """The model builder and the training dataset function of `cfg` at global batch `batch`,
    as the Trainer takes them (a builder, so each loop of a worker gets its own weights)."""
    from dist_share.families.build import build_model

    specs = input_specs(cfg.data)
    dataset_fn = make_dataset_fn(cfg.data, "train", batch, cfg.training.seed)

    def build_spec() -> Any:
        return build_model(cfg.model, specs)

    return build_spec, dataset_fn


def train_timed(
    cfg: Any, strategy: Any, batch: int, block: int
) -> tuple[Any, Callable[[], Any], Callable[..., Any]]:
    """Train `cfg` to its last step with a `make_timed_trainer` Trainer (no run directory).

    Returns:
        The closed trainer (its ``loop.windows`` / ``loop.cpu_windows`` hold the timings), and
        the model builder and dataset function it trained with, to measure the same model again.
    """
    build_spec, dataset_fn = model_and_data(cfg, batch)
    trainer = make_timed_trainer(block)(build_spec, strategy, cfg, None)
    trainer.train(dataset_fn)
    trainer.close()
    return trainer, build_spec, dataset_fn


def write_result(out_dir: Path, name: str, payload: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)
