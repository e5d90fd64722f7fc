"""Your own shared-weight model, trained by dist_share on any strategy, in one screen.

    python examples/custom_siamese.py                          # one process
    python examples/custom_siamese.py mirrored                 # all GPUs of this machine
    horovodrun -np 2 python examples/custom_siamese.py horovod # Horovod, any number of processes

The model is plain Keras; the only dist_share pieces are the SharedTower layer (one weight set
for both streams), a ModelSpec (model + per-example loss/metrics), and the Trainer.
"""

import sys
from pathlib import Path

import keras

import dist_share as ds
from dist_share.model.heads import L2Distance
from dist_share.model.losses import ContrastiveLoss
from dist_share.model.metrics import PairAccuracy

# 1. The strategy comes first: it may create devices or initialise Horovod before TF runs.
strategy = ds.get_strategy(ds.StrategyConfig(name=sys.argv[1] if len(sys.argv) > 1 else "local"))

# 2. The default Siamese config (typed, validated) gives data, optimizer and training settings.
default_config = Path(__file__).resolve().parents[1] / "configs" / "siamese_digits.yaml"
cfg = ds.load_config(default_config, ["training.steps=300", "training.eval_every=300"])


def build_spec() -> ds.ModelSpec:
    """Called by the Trainer inside strategy.scope(), so variables are replicated."""
    left, right = keras.Input((8, 8, 1), name="left"), keras.Input((8, 8, 1), name="right")
    tower = ds.SharedTower(
        block={"type": "mlp", "units": [128, 64], "activation": "relu"},
        num_streams=2,
        sharing="shared",  # gradients from both streams add up in one weight set
    )
    emb_left, emb_right = tower([keras.layers.Flatten()(left), keras.layers.Flatten()(right)])
    distance = L2Distance()([emb_left, emb_right])
    model = keras.Model({"left": left, "right": right}, distance)
    return ds.ModelSpec(
        model, ContrastiveLoss(margin=1.0), {"pair_accuracy": PairAccuracy(0.5)}, ["left", "right"]
    )


# 3. Global batch 64: each replica gets 64 / num_replicas; data is sharded per worker.
inputs = ds.RunInputs(cfg.data, cfg.training.batch_size, seed=0)  # the data, opened once
trainer = ds.Trainer(build_spec, strategy, cfg, run_dir=None)
result = trainer.train(inputs.train_fn, inputs.eval_fn)
if strategy.is_chief:  # only rank 0 prints
    print({k: round(v, 4) for k, v in result.items()})
