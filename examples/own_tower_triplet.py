"""Your own Keras encoder as the shared tower of a triplet network, trained on any strategy.

    python examples/own_tower_triplet.py                            # one process
    python examples/own_tower_triplet.py mirrored                   # all GPUs of this machine
    python examples/own_tower_triplet.py mirrored 2                 # 2 logical CPU replicas
    horovodrun -np 2 python examples/own_tower_triplet.py horovod   # Horovod

`make_encoder` is ordinary Keras, written without dist_share in mind: convolutions with
BatchNormalization and Dropout. SharedTower shares that one model across the three streams
(anchor, positive, negative) and folds them into one batch; its BatchNormalization layers are
converted to keep their statistics per stream, so folding computes exactly what three separate
calls would (docs/TOWERS.md).
"""

import sys
from pathlib import Path

import keras

import dist_share as ds
from dist_share.model.heads import TripletDistances
from dist_share.model.losses import TripletLoss
from dist_share.model.metrics import TripletAccuracy

# The strategy comes first: it may create devices or initialise Horovod before TF runs.
name = sys.argv[1] if len(sys.argv) > 1 else "local"
cpus = int(sys.argv[2]) if len(sys.argv) > 2 else None
strategy = ds.get_strategy(ds.StrategyConfig(name=name, num_cpu_devices=cpus))
default_config = Path(__file__).resolve().parents[1] / "configs" / "triplet_digits.yaml"
cfg = ds.load_config(default_config, ["training.steps=300", "training.eval_every=300"])
STREAMS = ["anchor", "positive", "negative"]


def make_encoder() -> keras.Model:
    """A user's image encoder: nothing here knows about streams or distribution."""
    image = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(32, 3, padding="same")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.1)(x)
    return keras.Model(image, keras.layers.Dense(32)(x), name="my_encoder")


def build_spec() -> ds.ModelSpec:
    """Called by the Trainer inside strategy.scope(), so the variables are replicated."""
    inputs = {name: keras.Input((8, 8, 1), name=name) for name in STREAMS}
    tower = ds.SharedTower(make_encoder(), num_streams=3)  # one weight set for the three streams
    embeddings = tower([inputs[name] for name in STREAMS])
    distances = TripletDistances()(embeddings)  # [B, 2]: d(anchor, positive), d(anchor, negative)
    model = keras.Model(inputs, distances)
    return ds.ModelSpec(
        model, TripletLoss(margin=1.0), {"triplet_accuracy": TripletAccuracy()}, STREAMS
    )


inputs = ds.RunInputs(cfg.data, cfg.training.batch_size, seed=0)  # the data, opened once
result = ds.Trainer(build_spec, strategy, cfg, run_dir=None).train(inputs.train_fn, inputs.eval_fn)
if strategy.is_chief:  # only rank 0 prints
    print({k: round(v, 4) for k, v in result.items()})
