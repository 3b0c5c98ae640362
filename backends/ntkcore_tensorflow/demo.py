"""The demo's MLP in Keras 3, built from numpy weights (see ``ntkcore demo``)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


def build_mlp(weights: list[tuple[np.ndarray, np.ndarray]], dtype: str) -> tuple[Any, dict[str, Any]]:
    """``keras.Sequential`` of Dense layers with ReLU between; weights are (in, out) and biases."""
    layers = [
        keras.layers.Dense(w.shape[1], activation="relu" if i < len(weights) - 1 else None, dtype=dtype)
        for i, (w, _) in enumerate(weights)
    ]
    model = keras.Sequential([keras.Input((weights[0][0].shape[0],), dtype=dtype), *layers])
    for layer, (w, b) in zip(layers, weights):
        layer.set_weights([w.astype(dtype), b.astype(dtype)])
    return model, {}
