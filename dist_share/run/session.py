"""A run resolved once: the strategy, the inputs and the model builder that every command shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dist_share.config.schema import Config
from dist_share.distribute.strategies import Strategy, get_strategy
from dist_share.families.build import ModelSpec, build_model
from dist_share.run.inputs import RunInputs
from dist_share.run.retrieval import RetrievalPass
from dist_share.train.trainer import Trainer


class Run:
    """One config turned into what training, evaluation and export need, each made once.

    ``inputs`` may be opened by the caller beforehand (to check the user's data before anything
    is created); the strategy is made here, before any TensorFlow op runs.
    """

    def __init__(self, cfg: Config, inputs: RunInputs | None = None) -> None:
        self.cfg = cfg
        # First TF call of the process: MirroredStrategy may still create logical CPU devices.
        self.strategy: Strategy = get_strategy(
            cfg.strategy, horovod_timeline=cfg.training.profile.horovod_timeline
        )
        self.inputs = inputs or RunInputs(cfg.data, cfg.training.batch_size, cfg.training.seed)

    @property
    def build_spec(self) -> Callable[[], ModelSpec]:
        """The model builder the trainer calls inside the strategy's scope."""
        return lambda: build_model(self.cfg.model, self.inputs.specs)

    def trainer(
        self, run_dir: Path | None, retrieval: bool = False, index: str | None = None
    ) -> Trainer:
        """The trainer; its evaluations add retrieval metrics with ``retrieval`` or
        ``training.retrieval_eval`` (and an approximate ``index`` judged against them)."""
        extra = None
        if retrieval or self.cfg.training.retrieval_eval:
            extra = RetrievalPass(self.cfg, self.strategy, index)
        return Trainer(self.build_spec, self.strategy, self.cfg, run_dir, extra_evaluation=extra)

    @contextmanager
    def input_errors(self) -> Iterator[None]:
        """TensorFlow errors about bad TFRecord input become a DataError naming file and stream."""
        import tensorflow as tf

        try:
            yield
        except tf.errors.OpError as e:
            explained = self.inputs.explain(e)
            if explained is None:
                raise
            explained.found_while_training = True
            raise explained from None
