"""``ntkcore.factorize`` for Keras: clone the model with ``FactorizedDense`` for chosen ``Dense``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from .layers import FactorizedDense


def _dense(model: Any) -> dict[str, Any]:
    """The model's own ``Dense`` layers (``clone_model`` swaps top-level layers, not those of
    nested models)."""
    return {layer.name: layer for layer in model.layers if type(layer) is keras.layers.Dense}


def dense_layers(model: Any, params: Any) -> dict[str, tuple[np.ndarray, bool]]:
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model must be a Keras Sequential or functional model to factorize, got {type(model).__name__}"
        )
    if params is not None:
        raise ValueError("params= is not used to factorize a Keras model: its own weights are factorized")
    if not model.built:
        raise ValueError("model: build the Keras model (call it once, or give it an Input) before factorizing it")
    return {
        name: (np.asarray(layer.kernel.numpy(), dtype=np.float64), layer.trainable and layer.kernel.trainable)
        for name, layer in _dense(model).items()
    }


def factorized(model: Any, params: Any, factors: Mapping[str, Any]) -> Any:
    def clone(layer: Any) -> Any:
        f = factors.get(layer.name)
        if f is None:
            return layer.__class__.from_config(layer.get_config())
        return FactorizedDense(
            layer.units, f.rank, activation=layer.activation, use_bias=layer.use_bias, name=layer.name,
            dtype=layer.dtype_policy, trainable=layer.trainable,
        )  # fmt: skip

    try:
        out = keras.models.clone_model(model, clone_function=clone)
    except ValueError as error:  # subclassed models cannot be cloned
        raise TypeError(
            f"model: {type(model).__name__} cannot be cloned by Keras ({error}); factorize supports Sequential "
            "and functional models; in a subclassed model use ntkcore_tensorflow.FactorizedDense directly"
        ) from error
    if not out.built:
        out.build(model.input_shape if hasattr(model, "input_shape") else None)
    old, new = model.layers, out.layers
    for a, b in zip(old, new):
        f = factors.get(a.name)
        if f is None:
            b.set_weights(a.get_weights())
            for va, vb in zip(a.weights, b.weights):  # a variable frozen on its own stays frozen
                vb.trainable = va.trainable
            continue
        b.u.kernel.assign(f.u.astype(b.u.kernel.dtype))
        b.v.kernel.assign(f.v.astype(b.v.kernel.dtype))
        if a.use_bias:
            b.v.bias.assign(a.bias)
        b.u.kernel.trainable = a.kernel.trainable
        b.v.kernel.trainable = a.kernel.trainable and f.train_v
    return out
