"""One architecture written in torch, Keras and flax linen, as a user porting it would: NHWC
inputs everywhere (the torch models permute to NCHW themselves), the same epsilons, activations
without approximations that differ between frameworks. Each builder takes a seed, so that the
three start from different random weights until ``ntkcore.transfer`` makes them equal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

EPS = 1e-5
VOCABULARY, TOKENS, WIDTH, HEADS = 11, 5, 8, 2
ARCHITECTURES = ("mlp", "cnn", "convs", "grouped", "conv1d", "transformer", "factorized")
# TensorFlow runs grouped convolutions on GPUs only: the grouped model is torch's and flax's
FRAMEWORKS = {"grouped": ("torch", "jax")}


def inputs(arch: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if arch == "transformer":
        return rng.integers(0, VOCABULARY, size=(3, TOKENS))
    shape = {"mlp": (3, 6), "factorized": (3, 6), "cnn": (3, 6, 6, 3), "convs": (3, 6, 6, 4), "grouped": (3, 6, 6, 4),
             "conv1d": (3, 7, 3)}[arch]  # fmt: skip
    return rng.normal(size=shape)


def torch_model(arch: str, seed: int, dtype: str, *, activation: Callable | None = None) -> Any:
    """``activation``: the hidden activation of the second layer (a deliberately different model)."""
    import torch
    from torch import nn

    from ntkcore_torch.layers import FactorizedLinear

    torch.manual_seed(seed)
    act = activation or torch.tanh

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if arch == "mlp":
                self.layers = nn.ModuleList([nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2)])
            elif arch == "factorized":
                self.layers = nn.ModuleList([FactorizedLinear(6, 8, rank=3), FactorizedLinear(8, 2, rank=2)])
            elif arch == "cnn":
                self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=EPS)
                self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=EPS)
                self.head = nn.Linear(4, 2)
            elif arch in ("convs", "grouped"):  # depthwise (multiplier 2), then pointwise or grouped
                self.depthwise = nn.Conv2d(4, 8, 3, padding=1, groups=4)
                self.second = nn.Conv2d(8, 6, 1) if arch == "convs" else nn.Conv2d(8, 6, 3, padding=1, groups=2)
                self.head = nn.Linear(6, 2)
            elif arch == "conv1d":
                self.c1, self.c2, self.head = nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(4, 4, 2), nn.Linear(4, 2)
            else:
                self.embed = nn.Embedding(VOCABULARY, WIDTH)
                self.ln1 = nn.LayerNorm(WIDTH, eps=EPS)
                self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
                self.ln2 = nn.LayerNorm(WIDTH, eps=EPS)
                self.fc1, self.fc2, self.head = nn.Linear(WIDTH, 16), nn.Linear(16, WIDTH), nn.Linear(WIDTH, 2)

        def forward(self, x: Any) -> Any:
            if arch in ("mlp", "factorized"):
                *hidden, last = self.layers
                for i, layer in enumerate(hidden):
                    x = act(layer(x)) if i == 1 else torch.tanh(layer(x))
                return last(x)
            if arch in ("cnn", "convs", "grouped"):
                h = x.permute(0, 3, 1, 2)
                if arch == "cnn":
                    h = torch.relu(self.b2(self.c2(act(self.b1(self.c1(h))))))
                else:
                    h = torch.tanh(self.second(act(self.depthwise(h))))
                return self.head(h.mean(dim=(2, 3)))
            if arch == "conv1d":
                h = self.c2(act(self.c1(x.permute(0, 2, 1))))
                return self.head(torch.tanh(h).mean(dim=2))
            h = self.embed(x)
            a = self.ln1(h)
            h = h + self.attn(a, a, a, need_weights=False)[0]
            h = h + self.fc2(act(self.fc1(self.ln2(h))))
            return self.head(h.mean(dim=1))

    net = Net().to(getattr(torch, dtype)).eval()
    for module in net.modules():  # running statistics other than 0 and 1, so that a lost one shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return net


def keras_model(arch: str, seed: int, dtype: str) -> Any:
    import keras

    from ntkcore_tensorflow.layers import FactorizedDense

    keras.utils.set_random_seed(seed)
    L = keras.layers
    kw = {"dtype": dtype}
    x = inputs(arch)
    inp = keras.Input(x.shape[1:], dtype="int32" if arch == "transformer" else dtype)
    if arch == "mlp":
        h = L.Dense(8, activation="tanh", **kw)(inp)
        h = L.Dense(8, activation="tanh", **kw)(h)
        out = L.Dense(2, **kw)(h)
    elif arch == "factorized":
        h = FactorizedDense(8, rank=3, activation="tanh", **kw)(inp)
        out = FactorizedDense(2, rank=2, **kw)(h)
    elif arch == "cnn":
        h = L.BatchNormalization(epsilon=EPS, **kw)(L.Conv2D(4, 3, padding="same", **kw)(inp))
        h = L.Activation("tanh", **kw)(h)
        h = L.BatchNormalization(epsilon=EPS, **kw)(L.Conv2D(4, 3, padding="same", use_bias=False, **kw)(h))
        out = L.Dense(2, **kw)(L.GlobalAveragePooling2D(**kw)(L.Activation("relu", **kw)(h)))
    elif arch == "convs":
        h = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="tanh", **kw)(inp)
        h = L.Conv2D(6, 1, activation="tanh", **kw)(h)
        out = L.Dense(2, **kw)(L.GlobalAveragePooling2D(**kw)(h))
    elif arch == "conv1d":
        h = L.Conv1D(4, 3, padding="same", activation="tanh", **kw)(inp)
        h = L.Activation("tanh", **kw)(L.Conv1D(4, 2, **kw)(h))
        out = L.Dense(2, **kw)(L.GlobalAveragePooling1D(**kw)(h))
    else:
        h = L.Embedding(VOCABULARY, WIDTH, **kw)(inp)
        a = L.LayerNormalization(epsilon=EPS, **kw)(h)
        h = L.Add(**kw)([h, L.MultiHeadAttention(HEADS, WIDTH // HEADS, **kw)(a, a)])
        m = L.Dense(WIDTH, **kw)(L.Dense(16, activation="tanh", **kw)(L.LayerNormalization(epsilon=EPS, **kw)(h)))
        out = L.Dense(2, **kw)(L.GlobalAveragePooling1D(**kw)(L.Add(**kw)([h, m])))
    return keras.Model(inp, out)


def flax_model(arch: str, seed: int, dtype: str) -> tuple[Callable, Any]:
    """(apply, variables) of a flax linen module (a plain function over dicts for the factorized MLP)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ntkcore_jax.layers import factorized_dense_apply, factorized_dense_init

    f = {"param_dtype": getattr(jnp, dtype), "dtype": getattr(jnp, dtype)}
    key = jax.random.PRNGKey(seed)
    if arch == "factorized":
        k1, k2 = jax.random.split(key)
        params = {
            "f1": factorized_dense_init(k1, 6, 8, rank=3, dtype=f["param_dtype"]),
            "f2": factorized_dense_init(k2, 8, 2, rank=2, dtype=f["param_dtype"]),
        }
        params = jax.tree_util.tree_map(lambda a: a + 0.1, params)

        def apply(p: Any, x: Any) -> Any:
            return factorized_dense_apply(p["f2"], jnp.tanh(factorized_dense_apply(p["f1"], x)))

        return apply, params

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            if arch == "mlp":
                return nn.Dense(2, **f)(jnp.tanh(nn.Dense(8, **f)(jnp.tanh(nn.Dense(8, **f)(x)))))
            if arch == "cnn":
                bn = {"use_running_average": True, "epsilon": EPS, **f}
                h = jnp.tanh(nn.BatchNorm(**bn)(nn.Conv(4, (3, 3), padding="SAME", **f)(x)))
                h = nn.relu(nn.BatchNorm(**bn)(nn.Conv(4, (3, 3), padding="SAME", use_bias=False, **f)(h)))
                return nn.Dense(2, **f)(h.mean(axis=(1, 2)))
            if arch in ("convs", "grouped"):
                h = jnp.tanh(nn.Conv(8, (3, 3), padding="SAME", feature_group_count=4, **f)(x))
                second = (
                    {"kernel_size": (1, 1)} if arch == "convs" else {"kernel_size": (3, 3), "feature_group_count": 2}
                )
                h = jnp.tanh(nn.Conv(6, padding="SAME", **second, **f)(h))
                return nn.Dense(2, **f)(h.mean(axis=(1, 2)))
            if arch == "conv1d":
                h = jnp.tanh(nn.Conv(4, (3,), padding="SAME", **f)(x))
                h = jnp.tanh(nn.Conv(4, (2,), padding="VALID", **f)(h))
                return nn.Dense(2, **f)(h.mean(axis=1))
            h = nn.Embed(VOCABULARY, WIDTH, **f)(x)
            a = nn.LayerNorm(epsilon=EPS, **f)(h)
            h = h + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=WIDTH, **f)(a, a)
            m = nn.Dense(WIDTH, **f)(jnp.tanh(nn.Dense(16, **f)(nn.LayerNorm(epsilon=EPS, **f)(h))))
            return nn.Dense(2, **f)((h + m).mean(axis=1))

    net = Net()
    variables = net.init(key, jnp.asarray(inputs(arch)))
    if "batch_stats" in variables:  # statistics other than 0 and 1, so that a lost one shows
        variables = {
            **variables,
            # flax keeps statistics in float32 whatever param_dtype is: as float64 users cast them
            "batch_stats": jax.tree_util.tree_map(lambda a: (a + 0.3).astype(f["dtype"]), variables["batch_stats"]),
        }
    return net.apply, variables
