"""The workloads as Keras 3 models (TensorFlow backend), the way a Keras user writes them."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from benchmarks.workloads import BN_EPSILON, CHANNELS, HEADS, HIDDEN, IMAGE, TOKENS, VOCABULARY, WIDTH, Workload

L = keras.layers


def build(workload: Workload, arrays: dict[str, np.ndarray], dtype: str = "float32") -> Any:
    a = {k: np.asarray(v, dtype) for k, v in arrays.items()}
    builder = {"transformer": _transformer, "cnn": _cnn, "resnet": _resnet}.get(workload.kind, _mlp)
    return builder(workload, a, dtype)


def _mlp(workload: Workload, a: dict, dtype: str) -> Any:
    from ntkcore_tensorflow import FactorizedDense

    depth = len(workload.widths) - 1
    layers, values = [], []
    for i in range(depth):
        activation = "relu" if i < depth - 1 else None
        if f"layer{i}.u" in a:
            u, v = a[f"layer{i}.u"], a[f"layer{i}.v"]
            layers.append(FactorizedDense(v.shape[1], rank=u.shape[1], activation=activation, dtype=dtype))
            values.append([u, v, a[f"layer{i}.b"]])
        else:
            layers.append(L.Dense(a[f"layer{i}.w"].shape[1], activation=activation, dtype=dtype))
            values.append([a[f"layer{i}.w"], a[f"layer{i}.b"]])
    model = keras.Sequential([keras.Input((workload.widths[0],), dtype=dtype), *layers])
    for layer, value in zip(layers, values):
        layer.set_weights(value)
    return model


def _cnn(workload: Workload, a: dict, dtype: str) -> Any:
    convs = [L.Conv2D(CHANNELS, 3, padding="same", activation="relu", dtype=dtype) for _ in range(3)]
    head = L.Dense(10, dtype=dtype)
    model = keras.Sequential([keras.Input(IMAGE, dtype=dtype), *convs, L.GlobalAveragePooling2D(dtype=dtype), head])
    for i, conv in enumerate(convs):
        conv.set_weights([a[f"conv{i}.w"], a[f"conv{i}.b"]])
    head.set_weights([a["head.w"], a["head.b"]])
    return model


def _resnet(workload: Workload, a: dict, dtype: str) -> Any:
    x = keras.Input(IMAGE, dtype=dtype)
    stem = L.Conv2D(CHANNELS, 3, padding="same", activation="relu", dtype=dtype)
    conv1, conv2 = (L.Conv2D(CHANNELS, 3, padding="same", use_bias=False, dtype=dtype) for _ in range(2))
    bn1, bn2 = (L.BatchNormalization(epsilon=BN_EPSILON, dtype=dtype) for _ in range(2))
    head = L.Dense(10, dtype=dtype)
    h = stem(x)
    y = L.ReLU(dtype=dtype)(bn1(conv1(h)))
    h = L.ReLU(dtype=dtype)(L.Add(dtype=dtype)([h, bn2(conv2(y))]))
    model = keras.Model(x, head(L.GlobalAveragePooling2D(dtype=dtype)(h)))
    stem.set_weights([a["conv0.w"], a["conv0.b"]])
    for i, conv, bn in ((1, conv1, bn1), (2, conv2, bn2)):
        conv.set_weights([a[f"conv{i}.w"]])
        bn.set_weights([a[f"bn{i}.g"], a[f"bn{i}.b"], a[f"bn{i}.mean"], a[f"bn{i}.var"]])
    head.set_weights([a["head.w"], a["head.b"]])
    return model


class _LastTokenLogits(L.Layer):
    """Logits of the last token from the embedding table itself (tied weights)."""

    def __init__(self, embedding: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h: Any) -> Any:
        return keras.ops.matmul(h[:, -1], keras.ops.transpose(self.embedding.embeddings))


def _transformer(workload: Workload, a: dict, dtype: str) -> Any:
    ids = keras.Input((TOKENS,), dtype="int32")
    embedding = L.Embedding(VOCABULARY, WIDTH, dtype=dtype)
    attention = L.MultiHeadAttention(HEADS, WIDTH // HEADS, dtype=dtype)
    ln1, ln2 = (L.LayerNormalization(epsilon=1e-5, dtype=dtype) for _ in range(2))
    mlp1, mlp2 = L.Dense(HIDDEN, activation="relu", dtype=dtype), L.Dense(WIDTH, dtype=dtype)
    h = embedding(ids)
    x = ln1(h)
    h = h + attention(x, x, use_causal_mask=True)
    h = h + mlp2(mlp1(ln2(h)))
    model = keras.Model(ids, _LastTokenLogits(embedding, dtype=dtype)(h))
    embedding.set_weights([a["embed"]])
    for layer, name in ((ln1, "ln1"), (ln2, "ln2")):
        layer.set_weights([a[f"{name}.g"], a[f"{name}.b"]])
    for layer, name in ((mlp1, "mlp1"), (mlp2, "mlp2")):
        layer.set_weights([a[f"{name}.w"], a[f"{name}.b"]])
    heads = (HEADS, WIDTH // HEADS)
    for c, dense in zip("qkv", (attention._query_dense, attention._key_dense, attention._value_dense)):
        dense.set_weights([a[f"{c}.w"].reshape(WIDTH, *heads), a[f"{c}.b"].reshape(heads)])
    attention._output_dense.set_weights([a["o.w"].reshape(*heads, WIDTH), a["o.b"]])
    return model
