"""The name under which dist_share's layers, losses and metrics are registered with Keras."""

from __future__ import annotations

import keras

# Saved models name the classes "dist_share>Class": changing it breaks loading them.
PACKAGE = "dist_share"


def register(cls: type) -> type:
    """Register a layer, loss or metric class so that saved models can be loaded."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)
