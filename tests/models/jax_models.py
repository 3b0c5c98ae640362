"""The zoo in JAX: plain functions ``f(params, x)`` over nested dicts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import Built
from .spec import spec

CAPABILITIES = frozenset()  # structured derivatives: capture not written yet for this backend
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def setup_numerics() -> None:
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")


def to_native(x: np.ndarray, dtype: str) -> jax.Array:
    return jnp.asarray(x, dtype=DTYPES[dtype] if np.issubdtype(x.dtype, np.floating) else None)


def to_numpy(a: jax.Array) -> np.ndarray:
    return np.asarray(a)


def _dense(p: dict, name: str, x: jax.Array) -> jax.Array:
    return x @ p[name]["w"] + p[name]["b"]


def _forward(case: str, consts: dict):
    if case == "mlp":

        def f(p, x):
            for name in ("l1", "l2", "l3"):
                x = jax.nn.relu(_dense(p, name, x))
            return _dense(p, "l4", x)
    elif case == "cnn":

        def f(p, x):
            y = (
                jax.lax.conv_general_dilated(
                    x,
                    p["conv"]["w"],
                    window_strides=(2, 2),
                    padding=((1, 1), (1, 1)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                )
                + p["conv"]["b"]
            )
            y = jax.nn.relu(y)
            n, h, w, c = y.shape
            y = y.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
            return _dense(p, "head", y.reshape(n, -1))
    elif case == "lowrank":

        def f(p, x):
            for name in ("l1", "l2"):
                x = jax.nn.relu(x @ p[name]["u"] @ p[name]["v"] + p[name]["b"])
            return _dense(p, "l3", x)
    elif case == "layernorm":

        def f(p, x):
            h = _dense(p, "l1", x)
            mu = h.mean(-1, keepdims=True)
            var = ((h - mu) ** 2).mean(-1, keepdims=True)
            h = (h - mu) / jnp.sqrt(var + 1e-5) * p["ln"]["gamma"] + p["ln"]["beta"]
            return _dense(p, "l2", jnp.tanh(h))
    elif case == "batchnorm_frozen":

        def f(p, x):
            h = _dense(p, "l1", x)
            h = (h - consts["bn.mean"]) / jnp.sqrt(consts["bn.var"] + 1e-5) * p["bn"]["gamma"] + p["bn"]["beta"]
            h = jax.nn.relu(jax.nn.relu(h) @ consts["l2.w"] + consts["l2.b"])
            return _dense(p, "l3", h)
    elif case == "multi_output":

        def f(p, x):
            return _dense(p, "l2", jnp.tanh(_dense(p, "l1", x))).reshape(x.shape[0], 3, 2)
    else:
        raise KeyError(case)
    return f


def _split(case: str, dtype: str) -> tuple[dict, dict]:
    s = spec(case)
    params: dict = {}
    consts = {}
    for key, value in s.weights.items():
        array = jnp.asarray(value, dtype=DTYPES[dtype])
        if key in s.constants:
            consts[key] = array
        else:
            layer, name = key.split(".")
            params.setdefault(layer, {})[name] = array
    return params, consts


@functools.cache  # one model per case and dtype, so compiled kernels are shared across tests
def build(case: str, dtype: str) -> Built:
    params, consts = _split(case, dtype)
    return Built(_forward(case, consts), {"params": params})


def reference_jacobians(case: str, x: np.ndarray) -> dict[str, np.ndarray]:
    params, consts = _split(case, "float64")
    f = _forward(case, consts)
    jac = jax.jacrev(f)(params, jnp.asarray(x, dtype=jnp.float64))
    n_out = len(spec(case).output_shape) + 1
    flat = jax.tree_util.tree_flatten_with_path(jac)[0]
    return {".".join(k.key for k in path): np.asarray(leaf).reshape((*leaf.shape[:n_out], -1)) for path, leaf in flat}


def is_native(a, dtype: str) -> bool:
    return isinstance(a, jax.Array) and a.dtype == DTYPES[dtype]


def forward(built: Built, x: np.ndarray) -> jax.Array:
    params = built.kwargs["params"]
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    return built.model(params, jnp.asarray(x, dtype=dtype))


def freeze(built: Built) -> Built:
    """A JAX function whose params hold no floating leaf: nothing to differentiate."""
    return Built(built.model, {"params": {}})


train_mode_batchnorm = None  # plain JAX functions carry no train/eval mode

STRUCTURED_CASES = ()
