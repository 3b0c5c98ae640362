"""The zoo in TensorFlow: Keras 3 ``Sequential`` models (TensorFlow backend) built from the spec's weights."""

from __future__ import annotations

import functools

import keras
import numpy as np
import tensorflow as tf

from . import Built
from .spec import WIDE, kwargs_weights, readout_weights, spec, structured_inputs

CAPABILITIES = frozenset({"structured"})
DTYPES = {"float32": tf.float32, "float64": tf.float64}
# Keras variable name -> the spec's short name (others are the same in both)
_SPEC_NAME = {"kernel": "w", "bias": "b", "moving_mean": "mean", "moving_variance": "var"}


def setup_numerics() -> None:
    tf.config.experimental.enable_tensor_float_32_execution(False)


def to_native(x: np.ndarray, dtype: str) -> tf.Tensor:
    return tf.constant(x, dtype=DTYPES[dtype] if np.issubdtype(x.dtype, np.floating) else None)


def to_numpy(a: tf.Tensor) -> np.ndarray:
    return np.asarray(a.numpy() if hasattr(a, "numpy") else a)


class LowRank(keras.layers.Layer):
    """A factorized dense layer x·U·V + b (arXiv 2210.04807)."""

    def __init__(self, rank: int, units: int, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.units = rank, units

    def build(self, input_shape):
        self.u = self.add_weight(shape=(input_shape[-1], self.rank), name="u")
        self.v = self.add_weight(shape=(self.rank, self.units), name="v")
        self.b = self.add_weight(shape=(self.units,), name="b", initializer="zeros")

    def call(self, x):
        return keras.ops.matmul(keras.ops.matmul(x, self.u), self.v) + self.b

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "units": self.units}


def _layers(case: str, dtype: str) -> list:
    L = keras.layers
    kw = {"dtype": dtype}
    if case == "mlp":
        return [*(L.Dense(8, activation="relu", name=n, **kw) for n in ("l1", "l2", "l3")), L.Dense(3, name="l4", **kw)]
    if case == "wide":
        return [L.Dense(WIDE, activation="relu", name="l1", **kw), L.Dense(3, name="l2", **kw)]
    if case == "cnn":
        return [
            L.ZeroPadding2D(1, **kw),
            L.Conv2D(4, 3, strides=2, padding="valid", activation="relu", name="conv", **kw),
            L.AveragePooling2D(2, **kw),
            L.Flatten(**kw),
            L.Dense(3, name="head", **kw),
        ]
    if case == "lowrank":
        return [
            LowRank(2, 8, name="l1", **kw),
            L.ReLU(**kw),
            LowRank(2, 8, name="l2", **kw),
            L.ReLU(**kw),
            L.Dense(3, name="l3", **kw),
        ]
    if case == "layernorm":
        return [
            L.Dense(8, name="l1", **kw),
            L.LayerNormalization(epsilon=1e-5, name="ln", **kw),
            L.Activation("tanh", **kw),
            L.Dense(3, name="l2", **kw),
        ]
    if case == "batchnorm_frozen":
        return [
            L.Dense(8, name="l1", **kw),
            L.BatchNormalization(epsilon=1e-5, name="bn", **kw),
            L.ReLU(**kw),
            L.Dense(8, activation="relu", name="l2", trainable=False, **kw),
            L.Dense(3, name="l3", **kw),
        ]
    if case == "multi_output":
        return [L.Dense(8, activation="tanh", name="l1", **kw), L.Dense(6, name="l2", **kw), L.Reshape((3, 2), **kw)]
    raise KeyError(case)


class TiedLogits(keras.layers.Layer):
    """Logits h·Eᵀ from an embedding layer's own table (weights tied)."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))


def _transformer(dtype: str, w: dict) -> keras.Model:
    """The spec's pre-LayerNorm block with Keras' MultiHeadAttention (causal), weights from ``w``."""
    L, kw = keras.layers, {"dtype": dtype}
    ids = keras.Input((4,), dtype="int64")
    embedding = L.Embedding(7, 8, name="embed", **kw)
    attention = L.MultiHeadAttention(2, 4, name="attn", **kw)
    h = embedding(ids)
    a = L.LayerNormalization(epsilon=1e-5, name="ln1", **kw)(h)
    h = h + attention(a, a, use_causal_mask=True)
    m = L.LayerNormalization(epsilon=1e-5, name="ln2", **kw)(h)
    h = h + L.Dense(8, name="mlp2", **kw)(L.Dense(16, activation="relu", name="mlp1", **kw)(m))
    model = keras.Model(ids, TiedLogits(embedding, name="logits", **kw)(h), name="transformer")
    embedding.embeddings.assign(w["embed.table"])
    for name in ("ln1", "ln2", "mlp1", "mlp2"):
        layer = model.get_layer(name)
        layer.set_weights(
            [w[f"{name}.gamma"], w[f"{name}.beta"]] if name.startswith("ln") else [w[f"{name}.w"], w[f"{name}.b"]]
        )
    for c, dense in zip("qkv", (attention._query_dense, attention._key_dense, attention._value_dense)):
        dense.set_weights([w[f"attn.w{c}"].reshape(8, 2, 4), w[f"attn.b{c}"].reshape(2, 4)])
    attention._output_dense.set_weights([w["attn.wo"].reshape(2, 4, 8), w["attn.bo"]])
    return model


def _spec_key(variable) -> str:
    layer, name = variable.path.split("/")[-2:]
    return f"{layer}.{_SPEC_NAME.get(name, name)}"


@functools.cache  # one model per case and dtype, so compiled kernels are shared across tests
def build(case: str, dtype: str) -> Built:
    s = spec(case)
    if case == "transformer":
        return Built(_transformer(dtype, {k: v.astype(dtype) for k, v in s.weights.items()}), {})
    model = keras.Sequential([keras.Input(s.input_shape, dtype=dtype), *_layers(case, dtype)], name=case)
    assigned = set()
    for variable in model.weights:
        key = _spec_key(variable)
        variable.assign(s.weights[key].astype(dtype))
        assigned.add(key)
    if assigned != set(s.weights):
        raise AssertionError(f"{case}: Keras weights {sorted(assigned)} != spec weights {sorted(s.weights)}")
    trainable = {_spec_key(v) for v in model.trainable_variables}
    if trainable != set(s.weights) - set(s.constants):
        raise AssertionError(f"{case}: trainable {sorted(trainable)} do not match the spec's constants {s.constants}")
    return Built(model, {})


def reference_jacobians(case: str, x: np.ndarray) -> dict[str, np.ndarray]:
    model = build(case, "float64").model
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        out = model(to_native(x, "float64"), training=False)
    jacobians = tape.jacobian(out, [v.value for v in variables], experimental_use_pfor=True)
    return {_spec_key(v): j.numpy().reshape((*out.shape, -1)) for v, j in zip(variables, jacobians)}


def is_native(a, dtype: str) -> bool:
    return isinstance(a, tf.Tensor) and a.dtype == DTYPES[dtype]


def forward(built: Built, x: np.ndarray) -> tf.Tensor:
    dtype = built.model.weights[0].dtype
    return built.model(tf.constant(x, dtype=dtype), training=False)


def freeze(built: Built) -> Built:
    """A copy of the model with every layer frozen (``trainable=False``): no trainable variable."""
    model = keras.models.clone_model(built.model)
    model.set_weights(built.model.get_weights())
    model.trainable = False
    return Built(model, built.kwargs)


train_mode_batchnorm = None  # Keras takes training= per call, and ntkcore always calls with training=False


def _structured_model(name: str):
    L, kw = keras.layers, {"dtype": "float64"}
    if name == "twice":  # one Dense applied twice in a functional model
        inputs = keras.Input((6,), dtype="float64")
        shared = L.Dense(6, activation="tanh", name="shared", **kw)
        outputs = L.Dense(3, name="head", **kw)(shared(shared(inputs)))
        return keras.Model(inputs, outputs)
    if name == "norule":  # a parameterised layer without a structure rule
        inputs = keras.Input((6,), dtype="float64")
        h = L.PReLU(name="act", **kw)(L.Dense(8, name="l1", **kw)(inputs))
        return keras.Model(inputs, L.Dense(3, name="l2", **kw)(h))
    if name == "tied":
        inputs = keras.Input((5,), dtype="int64")
        embedding = L.Embedding(11, 8, name="embed", **kw)
        h = L.LayerNormalization(epsilon=1e-5, name="ln", **kw)(embedding(inputs))
        h = L.Dense(8, activation="tanh", name="mix", **kw)(h)
        return keras.Model(inputs, TiedLogits(embedding, name="logits", **kw)(h)[..., :4])
    if name == "attention":  # MultiHeadAttention: its projections are EinsumDense layers
        inputs = keras.Input((5,), dtype="int64")
        h = L.Embedding(11, 8, name="embed", **kw)(inputs)
        h = h + L.MultiHeadAttention(2, 4, name="attention", **kw)(h, h)
        h = L.Dense(8, activation="relu", name="mlp", **kw)(h)
        return keras.Model(inputs, L.GlobalAveragePooling1D(**kw)(L.Dense(2, name="out", **kw)(h)))
    if name == "norms":
        inputs = keras.Input((8, 8, 2), dtype="float64")
        h = L.Conv2D(4, 3, padding="same", name="conv", **kw)(inputs)
        h = L.Activation("relu", **kw)(L.BatchNormalization(epsilon=1e-5, name="bn", **kw)(h))
        h = L.Dense(8, name="l1", **kw)(L.Flatten(**kw)(h))
        h = L.RMSNormalization(epsilon=1e-5, name="rms", **kw)(h)
        return keras.Model(inputs, L.Dense(3, name="head", **kw)(L.Activation("tanh", **kw)(h)))
    if name == "convs":  # strided; depthwise dilated; unbiased; 1D ('same' dilated, causal); 3D
        inputs = keras.Input((8, 8, 2), dtype="float64")
        y = L.Conv2D(4, 3, strides=2, padding="same", activation="tanh", name="c1", **kw)(inputs)
        y = L.DepthwiseConv2D(3, padding="same", dilation_rate=2, activation="tanh", name="c2", **kw)(y)
        # (no grouped Conv2D: TensorFlow cannot differentiate one on CPU, for any implementation)
        y = L.Conv2D(6, 2, use_bias=False, activation="tanh", name="c3", **kw)(y)
        z = L.Lambda(lambda t: t[:, 0], **kw)(inputs)
        z = L.Conv1D(3, 3, padding="same", dilation_rate=2, activation="tanh", name="d1", **kw)(z)
        z = L.Conv1D(3, 2, padding="causal", dilation_rate=2, activation="tanh", name="d2", **kw)(z)
        v = L.Reshape((8, 8, 2, 1), **kw)(inputs)
        v = L.Conv3D(2, (2, 3, 2), strides=(2, 1, 1), padding="same", activation="tanh", name="v", **kw)(v)
        h = L.Concatenate(**kw)([L.Flatten(**kw)(y), L.Flatten(**kw)(z), L.Flatten(**kw)(v)])
        return keras.Model(inputs, L.Dense(3, name="head", **kw)(h))
    raise KeyError(name)


def structured_case(name: str):
    """(model, x1, x2, fallback expected in the warning or None) for the structured tests."""
    keras.utils.set_random_seed(0)
    model = _structured_model(name)
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, size=4))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, size=4))
    for variable in model.trainable_variables:
        variable.assign(variable + 0.1 * rng.normal(size=variable.shape))
    x1, x2 = structured_inputs(name)
    expected = {"twice": None, "norule": "act", "tied": "embed", "attention": None, "norms": None, "convs": None}[name]
    return Built(model, {}), x1, x2, expected


STRUCTURED_CASES = ("twice", "norule", "tied", "attention", "norms", "convs")


def factorized_case() -> Built:
    """ntkcore's factorized dense layer (rank 2) in a small model."""
    from ntkcore_tensorflow import FactorizedDense

    keras.utils.set_random_seed(0)
    layers = [FactorizedDense(8, rank=2, activation="relu", dtype="float64"), keras.layers.Dense(3, dtype="float64")]
    return Built(keras.Sequential([keras.Input((6,), dtype="float64"), *layers]))


def linear(w: np.ndarray, b: np.ndarray) -> Built:
    """One dense layer f(x) = x·w + b (w is (in, out)), float64."""
    layer = keras.layers.Dense(w.shape[1], name="l", dtype="float64")
    model = keras.Sequential([keras.Input((w.shape[0],), dtype="float64"), layer])
    model.layers[0].set_weights([w, b])
    return Built(model, {})


def coupled_models() -> dict[str, Built]:
    """Three float64 models whose examples interact (inputs (N, 6), outputs (N, 3))."""
    operations = {
        "centering": lambda x: x - tf.reduce_mean(x, 0),
        "batch_statistic": lambda x: (x - tf.reduce_mean(x, 0)) / (tf.math.reduce_std(x, 0) + 1.0),
        "across_examples": lambda x: tf.nn.softmax(x @ tf.transpose(x), axis=-1) @ x,
    }
    return {
        name: Built(
            keras.Sequential(
                [
                    keras.Input((6,), dtype="float64"),
                    keras.layers.Lambda(op, dtype="float64"),
                    keras.layers.Dense(3, dtype="float64"),
                ]
            )
        )
        for name, op in operations.items()
    }


def bad_params() -> list[tuple[Built, type, str]]:
    """The mlp with params= that do not match its variables: (model, error type, message pattern)."""
    model = build("mlp", "float64").model
    return [
        (
            Built(model, {"params": {"mlp/l1/bias": np.ones(1)}}),
            ValueError,
            r"params\['mlp/l1/bias'\] has shape \(1,\), but the variable has \(8,\)",
        ),
        (
            Built(model, {"params": {"mlp/l1/bias": tf.ones(8, dtype=tf.float32)}}),
            TypeError,
            r"params\['mlp/l1/bias'\] has dtype float32",
        ),
        (
            Built(model, {"params": {"mlp/l9/bias": np.ones(8)}}),
            ValueError,
            r"names \['mlp/l9/bias'\] are not trainable",
        ),
    ]


def bad_params_together() -> tuple[Built, list[str]]:
    """Two mismatches in one params= map, and the names the one error must give."""
    params = {"mlp/l1/bias": np.ones(1), "mlp/l2/kernel": tf.ones((8, 8), dtype=tf.float32)}
    return Built(build("mlp", "float64").model, {"params": params}), ["mlp/l1/bias", "mlp/l2/kernel"]


def multi_output() -> Built:
    """float64: inputs (N, 6), output {"a": (N, 3), "b": ((N, 2), (N, 3))} (a functional model)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((6,), dtype="float64")
    h = keras.layers.Dense(8, activation="tanh", dtype="float64")(x)
    head = keras.layers.Dense(3, dtype="float64")
    a = head(h)
    b = keras.layers.Dense(2, dtype="float64")(h)
    twice = keras.layers.Rescaling(2.0, dtype="float64")(a)
    return Built(keras.Model(x, {"a": a, "b": (b, twice)}))


object_output = None  # a Keras model returns arrays or structures of them only


def recurrent_models() -> dict[str, tuple[Built, object]]:
    """float64 recurrent Keras models on inputs (N, 6 steps, 4), outputs (N, 2), each with its
    float64 reference Jacobians from a GradientTape over Keras' own (looped) layers."""
    layers = {
        "simple_rnn": lambda: keras.layers.SimpleRNN(5, dtype="float64"),
        "lstm": lambda: keras.layers.LSTM(5, dtype="float64"),
        "gru": lambda: keras.layers.GRU(5, dtype="float64"),
        "lstm_sequences": lambda: keras.layers.LSTM(5, return_sequences=True, dtype="float64"),
        # the wrapper needs its own dtype: at the default float32 policy it casts the float64
        # sequences to float32 in the middle of the model (every implementation is then float32-accurate)
        "bidirectional": lambda: keras.layers.Bidirectional(
            keras.layers.SimpleRNN(4, dtype="float64"), dtype="float64"
        ),
    }
    found = {}
    for name, make in layers.items():
        keras.utils.set_random_seed(0)
        stack = [keras.Input((6, 4), dtype="float64"), make()]
        if name == "lstm_sequences":
            stack += [keras.layers.GRU(3, dtype="float64")]
        model = keras.Sequential([*stack, keras.layers.Dense(2, dtype="float64")])

        def reference(x: np.ndarray, model: keras.Model = model) -> dict[str, np.ndarray]:
            with tf.GradientTape(persistent=True) as tape:
                out = model(tf.constant(x), training=False)
            return {
                v.path: tf.reshape(tape.jacobian(out, v, experimental_use_pfor=False), (*out.shape, -1)).numpy()
                for v in model.trainable_variables
            }

        found[name] = (Built(model), reference)
    return found


transformers_models = None  # the transformers zoo is torch's


def readout_model(variant: str) -> Built:
    """float64: tests/models/spec.py, ``READOUT_VARIANTS`` (a functional Keras model)."""
    w = readout_weights()
    if variant == "tied":
        ids = keras.Input((3,), dtype="int32")
        embedding = keras.layers.Embedding(11, 4, dtype="float64")
        body = keras.layers.Dense(4, use_bias=False, activation="tanh", dtype="float64")
        h = body(embedding(ids))
        logits = keras.layers.Lambda(lambda h: keras.ops.matmul(h, keras.ops.transpose(embedding.embeddings)))(h)
        model = keras.Model(ids, logits)
        embedding.set_weights([w["embedding"]])
        body.set_weights([w["w_tied"]])
        return Built(model)
    x = keras.Input((3, 5), dtype="float64")
    body = keras.layers.Dense(4, activation="tanh", dtype="float64")
    head = keras.layers.Dense(11, use_bias=variant != "no_bias", dtype="float64")
    h = body(x)
    out = head(h)
    if variant == "after_readout":
        branch = keras.layers.Dense(2, use_bias=False, dtype="float64")
        zero = keras.layers.Dense(11, use_bias=False, kernel_initializer="zeros", dtype="float64")
        out = keras.layers.Add(dtype="float64")([out, zero(branch(h))])
        branch.set_weights([w["branch"]])
    model = keras.Model(x, out)
    body.set_weights([w["w1"], w["b1"]])
    head.set_weights([w["a"], w["b"]] if variant != "no_bias" else [w["a"]])
    frozen = {"frozen_body": body, "frozen_readout": head}.get(variant)
    if frozen is not None:
        frozen.trainable = False
    return Built(model)


class _Keep(keras.Model):
    """tests/models/spec.py, ``kwargs_weights``: ``keep`` as a keyword argument, or as the last
    input feature (``in_input``)."""

    def __init__(self, in_input: bool) -> None:
        # a name of its own: the class's ("__keep") is no valid TensorFlow name scope inside tf.function
        super().__init__(name="keep_model", dtype="float64")
        self.in_input = in_input
        self.l1 = keras.layers.Dense(4, dtype="float64")
        self.l2 = keras.layers.Dense(3, dtype="float64")

    def call(self, x, keep=None, scale=1.0):
        if self.in_input:
            x, keep = x[..., :-1], x[..., -1]
        h = keras.ops.tanh(self.l1(x)) * keras.ops.cast(keep, x.dtype)[..., None]
        return self.l2(keras.ops.sum(h, axis=1)) * scale


def kwargs_model(in_input: bool = False) -> Built:
    """float64: tests/models/spec.py, ``kwargs_weights``."""
    model = _Keep(in_input)
    width = 6 if in_input else 5
    x = np.zeros((1, 3, width))
    model(x) if in_input else model(x, keep=np.ones((1, 3), dtype=bool))
    w = kwargs_weights()
    model.l1.set_weights([w["w1"], w["b1"]])
    model.l2.set_weights([w["w2"], w["b2"]])
    return Built(model)
