"""Keras' EinsumDense in the equations users write: dense on flattened axes is structured;
a bias over only part of the output, or an equation that is not a dense layer, falls back
(exact, warned) for what it cannot cover."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

import ntkcore


@pytest.fixture
def keras(active_backends):
    if "tensorflow" not in active_backends:
        pytest.skip("tensorflow not under test")
    import keras

    return keras


@pytest.mark.parametrize(
    ("equation", "output_shape", "bias_axes", "fallback"),
    [
        ("abc,cd->abd", (4, 5), "d", None),
        ("abc,cde->abde", (4, 2, 3), "de", None),
        ("...c,cd->...d", 5, "d", None),
        ("abc,cde->abde", (4, 2, 3), "e", "bias"),  # bias broadcast over d: not a dense bias
        ("abc,bcd->abd", (4, 5), None, "kernel"),  # a weight per token: no dense rule
    ],
)
def test_einsum_dense(keras, equation, output_shape, bias_axes, fallback):
    L = keras.layers
    inputs = keras.Input((4, 3), dtype="float64")
    layer = L.EinsumDense(equation, output_shape, bias_axes=bias_axes, activation="tanh", name="ed", dtype="float64")
    h = L.Flatten(dtype="float64")(layer(inputs))
    model = keras.Model(inputs, L.Dense(2, name="head", dtype="float64")(h))
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:
        variable.assign(rng.normal(size=variable.shape) / 2)
    x1, x2 = rng.normal(size=(3, 4, 3)), rng.normal(size=(2, 4, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = ntkcore.ntk(model, x1, x2, implementation="structured")
    expected = ntkcore.ntk(model, x1, x2, implementation="jacobian_contraction")
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(expected), rtol=1e-10, atol=1e-12)
    messages = [str(w.message) for w in caught if issubclass(w.category, ntkcore.StructuredFallbackWarning)]
    if fallback is None:
        assert messages == []
    else:
        assert len(messages) == 1 and f"ed/{fallback}" in messages[0], messages


def test_embedding_subclass_with_its_own_call_falls_back(keras):
    """An Embedding whose call also runs in reverse (logits from the table) is not a lookup."""

    class Reversible(keras.layers.Embedding):
        def call(self, inputs, reverse=False):
            if reverse:
                return keras.ops.matmul(inputs, keras.ops.transpose(self.embeddings))
            return super().call(inputs)

    class Tied(keras.Model):
        def __init__(self):
            super().__init__()
            self.embed = Reversible(6, 4, name="embed", dtype="float64")
            self.mix = keras.layers.Dense(4, activation="tanh", name="mix", dtype="float64")

        def call(self, ids):
            return keras.ops.mean(self.embed(self.mix(self.embed(ids)), reverse=True), axis=1)

    model = Tied()
    rng = np.random.default_rng(0)
    x1, x2 = rng.integers(0, 6, size=(3, 3)), rng.integers(0, 6, size=(2, 3))
    model(x1)
    with pytest.warns(ntkcore.StructuredFallbackWarning, match="embed"):
        kernel = ntkcore.ntk(model, x1, x2, implementation="structured")
    expected = ntkcore.ntk(model, x1, x2, implementation="jacobian_contraction")
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(expected), rtol=1e-10, atol=1e-12)


def test_factorize_refuses_subclassed_and_unbuilt_models(keras):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.ones((1, 6)))
    with pytest.raises(TypeError, match="factorize supports Sequential and functional models"):
        ntkcore.factorize(net, 2)
    unbuilt = keras.Sequential([keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="build the Keras model"):
        ntkcore.factorize(unbuilt, 2)
    with pytest.raises(ValueError, match="params= is not used to factorize a Keras model"):
        ntkcore.factorize(keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)]), 2, params={})


_EMPTY_BATCH = """
import numpy as np, keras, tensorflow as tf
from ntkcore.implementations import REGISTRY
from ntkcore.kernel_fn import KernelFn
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
for name in REGISTRY:
    fn = KernelFn(model, implementation=name)
    x1, _, out_shape, axes = fn.resolve(np.ones((4, 6), np.float32), None)
    print(name, tuple(fn.untiled(x1, tf.zeros((0, 6)), out_shape, axes).shape))
"""


def test_empty_batch_inside_does_not_crash(keras):
    """Graph-mode pfor over zero examples used to die of SIGFPE (structured derivatives) or fail
    (NTK-vector products); the adapter now gives the empty kernel. (The API refuses empty
    batches before any work; this reaches the adapter directly, in a child process.)"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _EMPTY_BATCH], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("(4, 0, 3, 3)") == len(ntkcore.implementations.REGISTRY), result.stdout


def test_keras_application(keras):
    """keras.applications.MobileNet with weights=None (depthwise and pointwise convolutions,
    eval-mode BatchNorm, ReLU6, dropout in inference mode) as users build it: every implementation against
    TensorFlow's own float64 autodiff, and structured derivatives cover every parameter."""
    import tensorflow as tf

    from ntkcore.implementations import AUTO, REGISTRY
    from ntkcore.testing import reference_kernel

    before = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # the layers read the global policy (another test may have set one)
    try:
        keras.utils.set_random_seed(0)
        model = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25, weights=None, classes=3)
    finally:
        keras.config.set_floatx(before[0])
        keras.config.set_dtype_policy(before[1])
    assert all(v.dtype == "float64" for v in model.weights)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 32, 32, 3)))
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=False)
    jac = tape.jacobian(out, variables, experimental_use_pfor=False)
    expected = reference_kernel({str(i): j.numpy().reshape(2, 3, -1) for i, j in enumerate(jac)}, output_ndim=2)
    for implementation in [*REGISTRY, AUTO]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kernel = ntkcore.ntk(model, x, implementation=implementation).numpy()
        fallback = [str(w.message) for w in caught if issubclass(w.category, ntkcore.StructuredFallbackWarning)]
        assert not fallback, fallback
        # float64 on both sides: 1e-9 of the largest entry is far above rounding (sums over 4e5
        # parameters), far below a wrong or missing layer
        np.testing.assert_allclose(kernel, expected, rtol=0, atol=1e-9 * np.abs(expected).max(), err_msg=implementation)


def _per_example_cases(tf):
    """(name, f, per-example arguments) covering each rule of ntkcore_tensorflow.pfor_rules: the
    per-example filter gradient of a convolution (its input per example, or shared with a
    per-example output gradient, in a map nested in another), a convolution with a per-example
    filter, the depthwise convolution and both its gradients with a shared filter."""
    rng = np.random.default_rng(0)

    def t(*shape):
        return tf.constant(rng.standard_normal(shape))

    def gradient(f, wrt):
        def of(*args):
            with tf.GradientTape() as tape:
                tape.watch(wrt)
                y = f(*args)
            return tape.gradient(y, wrt, output_gradients=args[-1])

        return of

    w, dw, x0 = t(3, 2, 3, 4), t(3, 3, 3, 2), t(2, 7, 6, 3)
    paddings = ("SAME", "VALID", [[0, 0], [1, 2], [0, 1], [0, 0]])
    cases = []
    for padding, stride in zip(paddings, (2, 1, 1)):
        conv = functools.partial(tf.nn.conv2d, strides=stride, padding=padding)
        out = conv(x0, w).shape[1:]
        cases += [
            (
                f"conv filter gradient {padding}",
                gradient(lambda x, g, conv=conv: conv(x[None], w), w),
                t(5, 7, 6, 3),
                t(5, 1, *out),
            ),
            (
                f"conv filter gradient, shared input {padding}",
                gradient(lambda g, conv=conv: conv(x0, w), w),
                t(5, 2, *out),
            ),
            (f"conv, per-example filter {padding}", lambda f, conv=conv: conv(x0, f), w[None] + t(5, *w.shape)),
        ]
    depthwise = functools.partial(tf.nn.depthwise_conv2d, strides=[1, 2, 2, 1], padding="SAME")
    out = depthwise(x0, dw).shape[1:]
    cases += [
        ("depthwise", lambda x: depthwise(x[None], dw), t(5, 7, 6, 3)),
        ("depthwise input gradient", gradient(lambda g: depthwise(x0, dw), x0), t(5, 2, *out)),
        ("depthwise filter gradient", gradient(lambda x, g: depthwise(x[None], dw), dw), t(5, 7, 6, 3), t(5, 1, *out)),
        ("depthwise filter gradient, shared input", gradient(lambda g: depthwise(x0, dw), dw), t(5, 2, *out)),
        ("depthwise, per-example filter", lambda f: depthwise(x0, f), dw[None] + t(5, *dw.shape)),
    ]
    return cases


def test_pfor_rules_vectorise_convolutions_exactly(keras, monkeypatch):
    """Each rule gives what a loop over the examples gives (float64: the same products summed in
    another order, 1e-12 of the largest entry), with no while_loop left, also with the map nested
    in another; TensorFlow's own registry is back as it was after the block."""
    import tensorflow as tf
    from tensorflow.python.ops.parallel_for import pfor

    from ntkcore_tensorflow import pfor_rules

    loops = []
    fallback = pfor._fallback_converter
    monkeypatch.setattr(pfor, "_fallback_converter", lambda p, *a, **k: loops.append(p.op_type) or fallback(p, *a, **k))
    before = dict(pfor._pfor_converter_registry)
    for name, f, *args in _per_example_cases(tf):
        expected = tf.stack([f(*(arg[i] for arg in args)) for i in range(5)])
        with pfor_rules.installed():
            mapped = tf.function(lambda f=f, args=args: tf.vectorized_map(lambda a: f(*a), tuple(args)))()
            nested = tf.function(  # the same map inside a map over two copies
                lambda f=f, args=args: tf.vectorized_map(
                    lambda s: tf.vectorized_map(lambda a: f(*a), tuple(a * s for a in args)),
                    tf.constant([1.0, -1.0], tf.float64),
                )
            )()
        scale = float(tf.reduce_max(tf.abs(expected)))
        np.testing.assert_allclose(mapped.numpy(), expected.numpy(), rtol=0, atol=1e-12 * scale, err_msg=name)
        np.testing.assert_allclose(nested.numpy()[0], expected.numpy(), rtol=0, atol=1e-12 * scale, err_msg=name)
        assert not loops, f"{name}: while_loop for {loops}"
    assert pfor._pfor_converter_registry == before
