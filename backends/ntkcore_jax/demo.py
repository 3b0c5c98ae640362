"""The demo's MLP in JAX, built from numpy weights (see ``ntkcore demo``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def build_mlp(weights: list[tuple[np.ndarray, np.ndarray]], dtype: str) -> tuple[Any, dict[str, Any]]:
    """f(params, x) with ReLU between layers; weights are (in, out) matrices and biases."""
    params = [{"w": jnp.asarray(w, dtype=dtype), "b": jnp.asarray(b, dtype=dtype)} for w, b in weights]

    def mlp(params: list, x: jax.Array) -> jax.Array:
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    return mlp, {"params": params}
