"""ntkcore's layers for JAX models, as init/apply pairs over plain dicts."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def factorized_dense_init(
    key: jax.Array, in_features: int, out_features: int, rank: int, dtype: Any = jnp.float32, bias: bool = True
) -> dict[str, jax.Array]:
    """Parameters of y = x·U·V + b (arXiv 2210.04807): U (in, rank), V (rank, out), b (out,).

    U and V are scaled so that U·V has the variance of a LeCun-initialised (in, out) matrix.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    ku, kv = jax.random.split(key)
    params = {
        "u": jax.random.normal(ku, (in_features, rank), dtype) / jnp.sqrt(in_features),
        "v": jax.random.normal(kv, (rank, out_features), dtype) / jnp.sqrt(rank),
    }
    if bias:
        params["b"] = jnp.zeros((out_features,), dtype)
    return params


def factorized_dense_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """(x·U)·V + b: applied as two chained dense pieces, so its cost scales with the rank."""
    y = (x @ params["u"]) @ params["v"]
    return y + params["b"] if "b" in params else y
