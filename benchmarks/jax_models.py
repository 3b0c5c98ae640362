"""The workloads as plain JAX functions ``f(params, x)``: shared by ntkcore-JAX and neural-tangents.

Written against jax.numpy and lax only, so that they run both under the project's JAX and
under the older JAX that neural-tangents 0.6.5 needs. BatchNorm statistics are constants
closed over by the function, not parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.workloads import BN_EPSILON, BUFFERS, HEADS, WIDTH, Workload


def build(workload: Workload, arrays: dict[str, np.ndarray], dtype: str = "float32") -> tuple[Any, dict]:
    """(f, {"params": trainable params}) for ``ntkcore.ntk_fn(f, **kwargs)``."""
    cast = {k: jnp.asarray(v, dtype) for k, v in arrays.items()}
    params = {k: v for k, v in cast.items() if not k.endswith(BUFFERS)}
    buffers = {k: v for k, v in cast.items() if k.endswith(BUFFERS)}
    f = {"transformer": _transformer, "cnn": _cnn, "resnet": _resnet}.get(workload.kind, _mlp)
    return (lambda p, x: f(p, buffers, x)), {"params": params}


def _mlp(p: dict, _: dict, x: jax.Array) -> jax.Array:
    depth = sum(k.endswith(".b") for k in p)
    for i in range(depth):
        if f"layer{i}.u" in p:  # factorized W = U·V, applied as two dense pieces
            x = (x @ p[f"layer{i}.u"]) @ p[f"layer{i}.v"] + p[f"layer{i}.b"]
        else:
            x = x @ p[f"layer{i}.w"] + p[f"layer{i}.b"]
        x = jax.nn.relu(x) if i < depth - 1 else x
    return x


def _conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cnn(p: dict, _: dict, x: jax.Array) -> jax.Array:
    for i in range(3):
        x = jax.nn.relu(_conv(x, p[f"conv{i}.w"]) + p[f"conv{i}.b"])
    return x.mean(axis=(1, 2)) @ p["head.w"] + p["head.b"]


def _resnet(p: dict, s: dict, x: jax.Array) -> jax.Array:
    def bn(y: jax.Array, i: int) -> jax.Array:
        inv = jax.lax.rsqrt(s[f"bn{i}.var"] + BN_EPSILON)
        return (y - s[f"bn{i}.mean"]) * inv * p[f"bn{i}.g"] + p[f"bn{i}.b"]

    h = jax.nn.relu(_conv(x, p["conv0.w"]) + p["conv0.b"])
    y = jax.nn.relu(bn(_conv(h, p["conv1.w"]), 1))
    h = jax.nn.relu(h + bn(_conv(y, p["conv2.w"]), 2))
    return h.mean(axis=(1, 2)) @ p["head.w"] + p["head.b"]


def _transformer(p: dict, _: dict, ids: jax.Array) -> jax.Array:
    def norm(h: jax.Array, name: str) -> jax.Array:
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-5) * p[f"{name}.g"] + p[f"{name}.b"]

    h = p["embed"][ids]
    a = norm(h, "ln1")
    n, s, _ = a.shape
    q, k, v = ((a @ p[f"{c}.w"] + p[f"{c}.b"]).reshape(n, s, HEADS, -1) for c in "qkv")
    scores = jnp.einsum("nshd,nthd->nhst", q, k) / np.sqrt(WIDTH // HEADS)
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
    heads = jnp.einsum("nhst,nthd->nshd", jax.nn.softmax(scores, axis=-1), v).reshape(n, s, WIDTH)
    h = h + heads @ p["o.w"] + p["o.b"]
    h = h + jax.nn.relu(norm(h, "ln2") @ p["mlp1.w"] + p["mlp1.b"]) @ p["mlp2.w"] + p["mlp2.b"]
    return h[:, -1] @ p["embed"].T
