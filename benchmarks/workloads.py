"""Benchmark workloads, defined once as numpy weights and built in each framework.

Each workload is (widths/shapes, N, axes); ``build(backend, name)`` returns the model, the
keyword arguments for ``ntkcore.ntk`` and float32 inputs. Weights come from one seeded
numpy RNG, so every framework computes the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "mlp", "factorized", "cnn", "transformer"
    n: int
    widths: tuple[int, ...] = ()
    rank: int = 0
    axes: dict = field(default_factory=dict)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("mlp512_full", "mlp", 32, (64, 512, 512, 512, 10)),
        Workload("mlp512_traced", "mlp", 32, (64, 512, 512, 512, 10), axes={"trace_axes": (-1,)}),
        Workload("mlp2048_full", "mlp", 16, (64, 2048, 2048, 10)),
        Workload("cnn_full", "cnn", 16),
        Workload("cnn_traced", "cnn", 16, axes={"trace_axes": (-1,)}),
        Workload("factorized_full", "factorized", 32, (64, 512, 512, 512, 10), rank=32),
        Workload("transformer_full", "transformer", 16),
        Workload("transformer_traced", "transformer", 16, axes={"trace_axes": (-1,)}),
    )
}
# the transformer block: vocabulary, tokens, width, heads, MLP width; logits of the last token
VOCABULARY, TOKENS, WIDTH, HEADS, HIDDEN = 128, 16, 64, 4, 256


def _weights(workload: Workload) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    if workload.kind == "transformer":  # pre-LayerNorm block, causal attention, logits tied to the embedding
        dense = {
            name: (rng.normal(size=(a, b)) / np.sqrt(a), 0.1 * rng.normal(size=b))
            for name, a, b in (
                *((c, WIDTH, WIDTH) for c in ("q", "k", "v", "o")),
                ("mlp1", WIDTH, HIDDEN),
                ("mlp2", HIDDEN, WIDTH),
            )
        }
        norms = {name: (1 + 0.1 * rng.normal(size=WIDTH), 0.1 * rng.normal(size=WIDTH)) for name in ("ln1", "ln2")}
        return {"embed": rng.normal(size=(VOCABULARY, WIDTH)), **dense, **norms}
    if workload.kind == "cnn":  # three 3×3 convolutions, 32 channels, 16×16×3 images, pool, dense 10
        convs = [(rng.normal(size=(3, 3, c, 32)) / np.sqrt(9 * c), 0.1 * rng.normal(size=32)) for c in (3, 32, 32)]
        return {"convs": convs, "head": (rng.normal(size=(32, 10)) / np.sqrt(32), 0.1 * rng.normal(size=10))}
    layers = []
    for i, (a, b) in enumerate(zip(workload.widths[:-1], workload.widths[1:])):
        hidden = 0 < i < len(workload.widths) - 2
        if workload.kind == "factorized" and hidden:
            layers.append(
                (
                    rng.normal(size=(a, workload.rank)) / np.sqrt(a),
                    rng.normal(size=(workload.rank, b)) * np.sqrt(2 / workload.rank),
                    0.1 * rng.normal(size=b),
                )
            )
        else:
            layers.append((rng.normal(size=(a, b)) * np.sqrt(2 / a), 0.1 * rng.normal(size=b)))
    return {"layers": layers}


def inputs(workload: Workload) -> np.ndarray:
    if workload.kind == "transformer":
        return np.random.default_rng(1).integers(0, VOCABULARY, size=(workload.n, TOKENS))
    shape = (16, 16, 3) if workload.kind == "cnn" else (workload.widths[0],)
    return np.random.default_rng(1).normal(size=(workload.n, *shape)).astype(np.float32)


def build(backend: str, workload: Workload) -> tuple[Any, dict]:
    weights = _weights(workload)
    return {"torch": _torch, "jax": _jax, "tensorflow": _keras}[backend](workload, weights)


def _torch(workload: Workload, weights: dict) -> tuple[Any, dict]:
    import torch
    from torch import nn

    from ntkcore_torch import FactorizedLinear

    def linear(w, b):
        layer = nn.Linear(*w.shape)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(w.T))
            layer.bias.copy_(torch.as_tensor(b))
        return layer

    if workload.kind == "transformer":

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(VOCABULARY, WIDTH)
                self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
                self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
                self.mlp1, self.mlp2 = linear(*weights["mlp1"]), linear(*weights["mlp2"])
                t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
                with torch.no_grad():
                    self.embed.weight.copy_(t(weights["embed"]))
                    for name in ("ln1", "ln2"):
                        getattr(self, name).weight.copy_(t(weights[name][0]))
                        getattr(self, name).bias.copy_(t(weights[name][1]))
                    self.attn.in_proj_weight.copy_(torch.cat([t(weights[c][0]).T for c in "qkv"]))
                    self.attn.in_proj_bias.copy_(torch.cat([t(weights[c][1]) for c in "qkv"]))
                    self.attn.out_proj.weight.copy_(t(weights["o"][0]).T)
                    self.attn.out_proj.bias.copy_(t(weights["o"][1]))
                self.register_buffer("mask", torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(1))
                self.logits = nn.Linear(WIDTH, VOCABULARY, bias=False)
                self.logits.weight = self.embed.weight  # tied, as transformer libraries do

            def forward(self, ids):
                h = self.embed(ids)
                a = self.ln1(h)
                h = h + self.attn(a, a, a, attn_mask=self.mask, need_weights=False)[0]
                h = h + self.mlp2(torch.relu(self.mlp1(self.ln2(h))))
                return self.logits(h[:, -1])

        return Block().float().eval(), {}
    if workload.kind == "cnn":

        class CNN(nn.Module):
            def __init__(self):
                super().__init__()
                self.convs = nn.ModuleList()
                for w, b in weights["convs"]:
                    conv = nn.Conv2d(w.shape[2], w.shape[3], 3, padding=1)
                    with torch.no_grad():
                        conv.weight.copy_(torch.as_tensor(w).permute(3, 2, 0, 1))
                        conv.bias.copy_(torch.as_tensor(b))
                    self.convs.append(conv)
                self.head = linear(*weights["head"])

            def forward(self, x):
                y = x.permute(0, 3, 1, 2)
                for conv in self.convs:
                    y = torch.relu(conv(y))
                return self.head(y.mean(dim=(2, 3)))

        return CNN().eval(), {}
    modules: list = []
    for layer in weights["layers"]:
        if len(layer) == 3:
            u, v, b = layer
            f = FactorizedLinear(u.shape[0], v.shape[1], rank=u.shape[1])
            with torch.no_grad():
                f.u.weight.copy_(torch.as_tensor(u.T))
                f.v.weight.copy_(torch.as_tensor(v.T))
                f.v.bias.copy_(torch.as_tensor(b))
            modules += [f, nn.ReLU()]
        else:
            modules += [linear(*layer), nn.ReLU()]
    return nn.Sequential(*modules[:-1]).float().eval(), {}


def _jax(workload: Workload, weights: dict) -> tuple[Any, dict]:
    import jax
    import jax.numpy as jnp

    from ntkcore_jax import factorized_dense_apply

    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    if workload.kind == "transformer":
        params = jax.tree_util.tree_map(f32, weights)

        def norm(h, gamma_beta):
            mu = h.mean(-1, keepdims=True)
            return (h - mu) / jnp.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma_beta[0] + gamma_beta[1]

        def block(p, ids):
            h = p["embed"][ids]
            a = norm(h, p["ln1"])
            n, s, _ = a.shape
            q, k, v = ((a @ p[c][0] + p[c][1]).reshape(n, s, HEADS, -1) for c in "qkv")
            scores = jnp.einsum("nshd,nthd->nhst", q, k) / np.sqrt(WIDTH // HEADS)
            scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
            heads = jnp.einsum("nhst,nthd->nshd", jax.nn.softmax(scores, axis=-1), v).reshape(n, s, WIDTH)
            h = h + heads @ p["o"][0] + p["o"][1]
            h = h + jax.nn.relu(norm(h, p["ln2"]) @ p["mlp1"][0] + p["mlp1"][1]) @ p["mlp2"][0] + p["mlp2"][1]
            return h[:, -1] @ p["embed"].T

        return block, {"params": params}
    if workload.kind == "cnn":
        params = {"convs": [(f32(w), f32(b)) for w, b in weights["convs"]], "head": tuple(map(f32, weights["head"]))}

        def cnn(p, x):
            for w, b in p["convs"]:
                x = jax.nn.relu(
                    jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
                )
            return x.mean(axis=(1, 2)) @ p["head"][0] + p["head"][1]

        return cnn, {"params": params}
    params = [
        {"u": f32(layer[0]), "v": f32(layer[1]), "b": f32(layer[2])}
        if len(layer) == 3
        else {"w": f32(layer[0]), "b": f32(layer[1])}
        for layer in weights["layers"]
    ]

    def mlp(p, x):
        for i, layer in enumerate(p):
            x = factorized_dense_apply(layer, x) if "u" in layer else x @ layer["w"] + layer["b"]
            x = jax.nn.relu(x) if i < len(p) - 1 else x
        return x

    return mlp, {"params": params}


def _keras(workload: Workload, weights: dict) -> tuple[Any, dict]:
    import keras

    from ntkcore_tensorflow import FactorizedDense

    if workload.kind == "transformer":
        return _keras_transformer(keras, weights), {}
    if workload.kind == "cnn":
        convs = [keras.layers.Conv2D(32, 3, padding="same", activation="relu") for _ in weights["convs"]]
        head = keras.layers.Dense(10)
        model = keras.Sequential([keras.Input((16, 16, 3)), *convs, keras.layers.GlobalAveragePooling2D(), head])
        for layer, (w, b) in zip(convs, weights["convs"]):
            layer.set_weights([w.astype("float32"), b.astype("float32")])
        head.set_weights([a.astype("float32") for a in weights["head"]])
        return model, {}
    layers, values = [], []
    for i, layer in enumerate(weights["layers"]):
        activation = "relu" if i < len(weights["layers"]) - 1 else None
        if len(layer) == 3:
            layers.append(FactorizedDense(layer[1].shape[1], rank=layer[0].shape[1], activation=activation))
        else:
            layers.append(keras.layers.Dense(layer[0].shape[1], activation=activation))
        values.append([a.astype("float32") for a in layer])
    model = keras.Sequential([keras.Input((workload.widths[0],)), *layers])
    for layer, value in zip(layers, values):
        layer.set_weights(value)
    return model, {}


def _keras_transformer(keras: Any, weights: dict) -> Any:
    L = keras.layers

    class LastTokenLogits(L.Layer):
        """Logits of the last token from the embedding table itself (tied weights)."""

        def __init__(self, embedding, **kwargs):
            super().__init__(**kwargs)
            self.embedding = embedding

        def call(self, h):
            return keras.ops.matmul(h[:, -1], keras.ops.transpose(self.embedding.embeddings))

    ids = keras.Input((TOKENS,), dtype="int32")
    embedding = L.Embedding(VOCABULARY, WIDTH)
    attention = L.MultiHeadAttention(HEADS, WIDTH // HEADS)
    ln1, ln2 = L.LayerNormalization(epsilon=1e-5), L.LayerNormalization(epsilon=1e-5)
    mlp1, mlp2 = L.Dense(HIDDEN, activation="relu"), L.Dense(WIDTH)
    h = embedding(ids)
    a = ln1(h)
    h = h + attention(a, a, use_causal_mask=True)
    h = h + mlp2(mlp1(ln2(h)))
    model = keras.Model(ids, LastTokenLogits(embedding)(h))
    f32 = lambda *arrays: [np.asarray(a, np.float32) for a in arrays]  # noqa: E731
    embedding.set_weights(f32(weights["embed"]))
    for layer, name in ((ln1, "ln1"), (ln2, "ln2"), (mlp1, "mlp1"), (mlp2, "mlp2")):
        layer.set_weights(f32(*weights[name]))
    heads = (HEADS, WIDTH // HEADS)
    for c, dense in zip("qkv", (attention._query_dense, attention._key_dense, attention._value_dense)):
        dense.set_weights(f32(weights[c][0].reshape(WIDTH, *heads), weights[c][1].reshape(heads)))
    attention._output_dense.set_weights(f32(weights["o"][0].reshape(*heads, WIDTH), weights["o"][1]))
    return model
