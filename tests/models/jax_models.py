"""The zoo in JAX: plain functions ``f(params, x)`` over nested dicts."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import Built
from .spec import kwargs_weights, readout_weights, spec, structured_inputs

CAPABILITIES = frozenset({"structured"})
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
    elif case == "wide":

        def f(p, x):
            return _dense(p, "l2", jax.nn.relu(_dense(p, "l1", x)))
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
    elif case == "transformer":

        def f(p, ids):
            table = p["embed"]["table"]
            h = table[ids]
            a = _layer_norm(h, p["ln1"]["gamma"], p["ln1"]["beta"])
            n, s, _ = a.shape
            q, k, v = ((a @ p["attn"][f"w{c}"] + p["attn"][f"b{c}"]).reshape(n, s, 2, 4) for c in "qkv")
            scores = jnp.einsum("nshd,nthd->nhst", q, k) / 2.0
            scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
            heads = jnp.einsum("nhst,nthd->nshd", jax.nn.softmax(scores, axis=-1), v).reshape(n, s, 8)
            h = h + heads @ p["attn"]["wo"] + p["attn"]["bo"]
            h = h + _dense(
                p, "mlp2", jax.nn.relu(_dense(p, "mlp1", _layer_norm(h, p["ln2"]["gamma"], p["ln2"]["beta"])))
            )
            return h @ table.T
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
    jac = jax.jacrev(f)(params, to_native(x, "float64"))
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


def _layer_norm(h: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
    mu = h.mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta


def _structured_model(name: str):
    if name == "twice":  # one dense layer applied twice: cross terms between its two uses

        def f(p, x):
            h = jnp.tanh(jnp.tanh(x @ p["shared"]["w"] + p["shared"]["b"]) @ p["shared"]["w"] + p["shared"]["b"])
            return h @ p["head"]["w"] + p["head"]["b"]

        shapes = {"shared": {"w": (6, 6), "b": (6,)}, "head": {"w": (6, 3), "b": (3,)}}
    elif name == "norule":  # a learned log-scale: exp of a parameter has no structure rule

        def f(p, x):
            return jnp.tanh(jnp.exp(p["log_scale"]) * (x @ p["l1"]["w"] + p["l1"]["b"])) @ p["l2"]

        shapes = {"l1": {"w": (6, 8), "b": (8,)}, "log_scale": (8,), "l2": (8, 3)}
    elif name == "tied":  # embedding gathered, then reused as the output projection

        def f(p, ids):
            h = _layer_norm(p["embed"][ids], p["ln"]["gamma"], p["ln"]["beta"])
            h = jnp.tanh(h @ p["mix"]["w"] + p["mix"]["b"])
            return (h @ p["embed"].T)[..., :4]

        shapes = {"embed": (11, 8), "ln": {"gamma": (8,), "beta": (8,)}, "mix": {"w": (8, 8), "b": (8,)}}
    elif name == "attention":  # single-head self-attention over tokens: dense layers with token axes

        def f(p, ids):
            h = p["embed"][ids]
            q, k, v = (h @ p[n] for n in ("wq", "wk", "wv"))
            attention = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(8.0), axis=-1)
            h = h + (attention @ v) @ p["wo"]
            return (jax.nn.relu(h @ p["mlp"]["w"] + p["mlp"]["b"]) @ p["out"]).mean(axis=1)

        shapes = {
            "embed": (11, 8),
            "wq": (8, 8),
            "wk": (8, 8),
            "wv": (8, 8),
            "wo": (8, 8),
            "mlp": {"w": (8, 8), "b": (8,)},
            "out": (8, 2),
        }
    elif name == "norms":  # convolution (no rule yet), per-channel affine, RMS-style scale

        def f(p, x):
            y = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = jax.nn.relu(y * p["bn"]["gamma"] + p["bn"]["beta"]).reshape(x.shape[0], -1)
            h = y @ p["l1"]["w"] + p["l1"]["b"]
            h = h / jnp.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * p["rms"]
            return jnp.tanh(h) @ p["head"]["w"] + p["head"]["b"]

        shapes = {
            "conv": (3, 3, 2, 4),
            "bn": {"gamma": (4,), "beta": (4,)},
            "l1": {"w": (256, 8), "b": (8,)},
            "rms": (8,),
            "head": {"w": (8, 3), "b": (3,)},
        }
    elif name == "convs":  # strided; depthwise dilated SAME; grouped; and a 1D convolution

        def conv(x, w, stride=1, padding="SAME", dilation=1, groups=1, spec=("NHWC", "HWIO", "NHWC")):
            n = len(spec[0]) - 2
            return jax.lax.conv_general_dilated(
                x,
                w,
                (stride,) * n,
                padding,
                rhs_dilation=(dilation,) * n,
                dimension_numbers=spec,
                feature_group_count=groups,
            )

        def f(p, x):
            y = jnp.tanh(conv(x, p["c1"], stride=2, padding=((1, 1), (1, 1))) + p["b1"])
            y = jnp.tanh(conv(y, p["c2"], dilation=2, groups=4))
            y = jnp.tanh(conv(y, p["c3"], padding="VALID", groups=2))
            z = jnp.tanh(conv(x[:, 0], p["d1"], dilation=2, spec=("NWC", "WIO", "NWC")))
            h = jnp.concatenate([y.reshape(x.shape[0], -1), z.reshape(x.shape[0], -1)], axis=1)
            return h @ p["head"]

        shapes = {
            "c1": (3, 3, 2, 4),
            "b1": (4,),
            "c2": (3, 3, 1, 4),
            "c3": (2, 2, 2, 6),
            "d1": (3, 2, 3),
            "head": (6 * 3 * 3 + 8 * 3, 3),
        }
    else:
        raise KeyError(name)
    return f, shapes


def structured_case(name: str):
    """(model, x1, x2, fallback expected in the warning or None) for the structured tests."""
    f, shapes = _structured_model(name)
    rng = np.random.default_rng(11)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0])), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
    x1, x2 = structured_inputs(name)
    expected = {"twice": None, "norule": "log_scale", "tied": None, "attention": None, "norms": None, "convs": None}[
        name
    ]
    return Built(f, {"params": params}), jnp.asarray(x1), jnp.asarray(x2), expected


STRUCTURED_CASES = ("twice", "norule", "tied", "attention", "norms", "convs")


def factorized_case() -> Built:
    """ntkcore's factorized dense layer (rank 2) in a small model."""
    from ntkcore_jax import factorized_dense_apply, factorized_dense_init

    params = {
        "f": factorized_dense_init(jax.random.PRNGKey(0), 6, 8, rank=2, dtype=jnp.float64),
        "w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3))),
    }
    params["f"]["b"] = params["f"]["b"] + 0.1

    def f(p, x):
        return jax.nn.relu(factorized_dense_apply(p["f"], x)) @ p["w"]

    return Built(f, {"params": params})


def linear(w: np.ndarray, b: np.ndarray) -> Built:
    """One dense layer f(x) = x·w + b (w is (in, out)), float64."""
    params = {"l": {"w": jnp.asarray(w, dtype=jnp.float64), "b": jnp.asarray(b, dtype=jnp.float64)}}
    return Built(lambda p, x: _dense(p, "l", x), {"params": params})


def coupled_models() -> dict[str, Built]:
    """Three float64 models whose examples interact (inputs (N, 6), outputs (N, 3))."""
    w = jnp.asarray(np.random.default_rng(3).normal(size=(6, 3)), dtype=jnp.float64)

    def centering(p, x):
        return (x - x.mean(0)) @ p["w"]

    def batch_statistic(p, x):  # BatchNorm-like: the batch's own mean and spread
        return ((x - x.mean(0)) / (x.std(0) + 1.0)) @ p["w"]

    def across_examples(p, x):  # attention across the examples of the batch
        return (jax.nn.softmax(x @ x.T, axis=-1) @ x) @ p["w"]

    return {f.__name__: Built(f, {"params": {"w": w}}) for f in (centering, batch_statistic, across_examples)}


def bad_params() -> list[tuple[Built, type, str]]:
    """The mlp with params that do not fit it: (model, error type, message pattern)."""
    built = build("mlp", "float64")
    params = built.kwargs["params"]
    missing = {"params": {k: v for k, v in params.items() if k != "l4"}}
    wrong = {"params": {**params, "l1": {**params["l1"], "w": jnp.ones((7, 8), dtype=jnp.float64)}}}
    return [
        (Built(built.model, missing), ValueError, r"x1: .* it reads params\['l4'\], which params= lacks"),
        (Built(built.model, wrong), ValueError, r"x1: the model cannot be evaluated on examples of shape \(6,\)"),
    ]


bad_params_together = None  # a JAX function's params are the model's own: nothing to match them against


def multi_output() -> Built:
    """float64: inputs (N, 6), output {"a": (N, 3), "b": ((N, 2), (N, 3))}."""
    rng = np.random.default_rng(0)
    params = {
        k: jnp.asarray(rng.normal(size=s) / 3, dtype=jnp.float64)
        for k, s in (("w", (6, 8)), ("a", (8, 3)), ("b", (8, 2)))
    }

    def f(p, x):
        h = jnp.tanh(x @ p["w"])
        return {"a": h @ p["a"], "b": (h @ p["b"], 2 * (h @ p["a"]))}

    return Built(f, {"params": params})


class _Record:
    """An output object (as transformers' ModelOutput is to a model's user): not an array."""

    def __init__(self, logits: jax.Array) -> None:
        self.logits = logits


def object_output() -> Built:
    """float64: inputs (N, 6), output an object whose ``logits`` is (N, 3)."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), dtype=jnp.float64)
    return Built(lambda p, x: _Record(x @ p["w"]), {"params": {"w": w}})


def recurrent_models() -> dict[str, tuple[Built, object]]:
    """float64 JAX recurrent models (``lax.scan``) on inputs (N, 6 steps, 4), outputs (N, 2), with
    float64 reference Jacobians from ``jax.jacrev``."""
    rng = np.random.default_rng(1)
    params = {
        "wx": rng.normal(size=(4, 5)) / 2,
        "wh": rng.normal(size=(5, 5)) / 3,
        "b": rng.normal(size=(5,)) / 4,
        "o": rng.normal(size=(5, 2)),
    }
    params = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}

    def scan_rnn(p, x):
        def step(h, xt):
            h = jnp.tanh(xt @ p["wx"] + h @ p["wh"] + p["b"])
            return h, h

        h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 5), dtype=x.dtype), jnp.swapaxes(x, 0, 1))
        return h @ p["o"]

    found = {"scan_rnn": (scan_rnn, params)} | _library_recurrent_models()
    return {name: (Built(model, {"params": p}), _scan_reference(model, p)) for name, (model, p) in found.items()}


def _scan_reference(model: Callable, params: Any) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        jac = jax.jacrev(lambda p: model(p, jnp.asarray(x, dtype=jnp.float64)))(params)
        leaves = jax.tree_util.tree_leaves(jac)
        return {str(i): np.asarray(v).reshape(*np.asarray(v).shape[:2], -1) for i, v in enumerate(leaves)}

    return reference


def _library_recurrent_models() -> dict[str, tuple[Callable, Any]]:
    """flax linen ``nn.RNN`` (an LSTM, then a GRU run in reverse) and an equinox GRU cell in a
    ``lax.scan``, where those libraries are installed: (apply, params)."""
    found = {}
    x = jnp.zeros((1, 6, 4), dtype=jnp.float64)
    if importlib.util.find_spec("flax") is not None:
        import flax.linen as nn

        class LinenRNN(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = nn.RNN(nn.LSTMCell(5, param_dtype=jnp.float64))(x)
                h = nn.RNN(nn.GRUCell(5, param_dtype=jnp.float64), reverse=True)(h)
                return nn.Dense(2, param_dtype=jnp.float64)(h[:, -1])

        linen = LinenRNN()
        found["linen_rnn"] = (linen.apply, linen.init(jax.random.PRNGKey(0), x))
    if importlib.util.find_spec("equinox") is not None:
        import equinox as eqx

        cell = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64), eqx.nn.GRUCell(4, 5, key=jax.random.PRNGKey(3))
        )

        def equinox_gru(cell: Any, x: Any) -> Any:
            def one(seq: Any) -> Any:
                h, _ = jax.lax.scan(lambda h, t: (cell(t, h), None), jnp.zeros(5, dtype=seq.dtype), seq)
                return h[:2]

            return jax.vmap(one)(x)

        found["equinox_gru"] = (equinox_gru, cell)
    return found


transformers_models = None  # the transformers zoo is torch's


def readout_model(variant: str) -> Built:
    """float64: tests/models/spec.py, ``READOUT_VARIANTS`` (frozen parameters: ``trainable=``)."""
    w = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in readout_weights().items()}
    if variant == "tied":
        params = {"embedding": w["embedding"], "body": w["w_tied"]}
        return Built(lambda p, x: jnp.tanh(p["embedding"][x] @ p["body"]) @ p["embedding"].T, {"params": params})
    params = {"body": {"w": w["w1"], "b": w["b1"]}, "head": {"w": w["a"], "b": w["b"]}}
    if variant == "no_bias":
        del params["head"]["b"]
    if variant == "after_readout":
        params["branch"], params["zero"] = w["branch"], w["zero"]

    def f(p, x):
        h = jnp.tanh(x @ p["body"]["w"] + p["body"]["b"])
        out = h @ p["head"]["w"] + p["head"]["b"] if "b" in p["head"] else h @ p["head"]["w"]
        return out + (h @ p["branch"]) @ p["zero"] if "zero" in p else out

    kwargs = {"params": params}
    frozen = {"frozen_body": "body", "frozen_readout": "head"}.get(variant)
    if frozen is not None:
        kwargs["trainable"] = lambda name: not name.startswith(frozen)
    return Built(f, kwargs)


def kwargs_model(in_input: bool = False) -> Built:
    """float64: tests/models/spec.py, ``kwargs_weights``."""
    params = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in kwargs_weights().items()}

    def f(p, x, keep=None, scale=1.0):
        if in_input:
            x, keep = x[..., :-1], x[..., -1]
        h = jnp.tanh(x @ p["w1"] + p["b1"]) * keep[..., None].astype(x.dtype)
        return (h.sum(1) @ p["w2"] + p["b2"]) * scale

    return Built(f, {"params": params})
