"""The analysis toolkit on every backend: spectrum, the matrix-free operator and Lanczos,
per-layer kernels, the linearised model and the kernel predictions of training.

Everything runs in float64 (every backend allows it), so tolerances are set by the algorithms,
not by rounding: equalities that are exact in exact arithmetic hold to 1e-9 relative (a few
hundred products summed; rounding is near 1e-14), Lanczos to 1e-6 (ARPACK's default accuracy
on a 12×12 operator), and the linearisation bounds below state their own reasons.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import ntkcore
from ntkcore.arrays import layer_name
from tests.models.spec import inputs

DTYPE = "float64"
EXACT = 1e-9


def _close(actual, expected, rtol: float = EXACT) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-300)
    assert float(np.abs(actual - expected).max()) <= rtol * scale


def _kernel(zoo, case: str, x, x2=None, **options):
    built = zoo.build(case, DTYPE)
    native2 = None if x2 is None else zoo.to_native(x2, DTYPE)
    return ntkcore.ntk(built.model, zoo.to_native(x, DTYPE), native2, **built.kwargs, **options)


def _prepared(backend: str, zoo, case: str):
    built = zoo.build(case, DTYPE)
    adapter = ntkcore.get_backend(backend)
    return adapter, adapter.prepare(built.model, built.kwargs.get("params"))


# -- spectrum --------------------------------------------------------------------------------
def test_spectrum_of_a_known_matrix(zoo):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    values = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 10.0])
    matrix = zoo.to_native((q * values) @ q.T, DTYPE)
    result = ntkcore.spectrum(matrix)
    assert zoo.is_native(result.eigenvalues, DTYPE)
    _close(zoo.to_numpy(result.eigenvalues), values)
    assert result.lambda_min == pytest.approx(0.5) and result.lambda_max == pytest.approx(10.0)
    assert result.condition_number == pytest.approx(20.0)
    assert result.trace == pytest.approx(values.sum())
    p = values / values.sum()
    assert result.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    _close(zoo.to_numpy(ntkcore.spectrum(matrix, k=2, which="largest").eigenvalues), [4.0, 10.0])
    smallest = ntkcore.spectrum(matrix, k=2, which="smallest")
    _close(zoo.to_numpy(smallest.eigenvalues), [0.5, 1.0])
    assert smallest.lambda_max is None and smallest.effective_rank is None


def test_spectrum_of_a_full_kernel_flattens_it(zoo):
    x1, _ = inputs("multi_output")
    kernel = _kernel(zoo, "multi_output", x1)  # (4, 4, 3, 2, 3, 2)
    result = ntkcore.spectrum(kernel)
    flat = zoo.to_numpy(ntkcore.flatten(kernel))
    _close(zoo.to_numpy(result.eigenvalues), np.linalg.eigvalsh(flat))


# -- the matrix-free operator ----------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp", "multi_output"])
@pytest.mark.parametrize("traced", [False, True], ids=["full", "trace"])
def test_operator_matvec_equals_kernel_product(zoo, case, traced):
    x1, _ = inputs(case)
    options = {"trace_axes": (-1,)} if traced else {}
    built = zoo.build(case, DTYPE)
    op = ntkcore.ntk_operator(built.model, zoo.to_native(x1, DTYPE), **built.kwargs, **options)
    matrix = zoo.to_numpy(ntkcore.flatten(_kernel(zoo, case, x1, **options)))
    assert op.shape == matrix.shape
    v = np.random.default_rng(1).normal(size=matrix.shape[0])
    _close(op.matvec(v), matrix @ v)  # numpy in, numpy out
    native = op.matvec(zoo.to_native(v, DTYPE))  # framework in, framework out
    assert zoo.is_native(native, DTYPE)
    _close(zoo.to_numpy(native), matrix @ v)
    block = np.random.default_rng(2).normal(size=(matrix.shape[0], 2))
    _close(op @ block, matrix @ block)
    exact = np.linalg.eigvalsh(matrix)
    result = ntkcore.spectrum(op, k=1)
    assert result.lambda_max == pytest.approx(exact[-1], rel=1e-6)
    assert result.lambda_min == pytest.approx(exact[0], rel=1e-6)


def test_operator_refuses_a_vector_of_the_wrong_size(zoo):
    x1, _ = inputs("mlp")
    built = zoo.build("mlp", DTYPE)
    op = ntkcore.ntk_operator(built.model, zoo.to_native(x1, DTYPE), **built.kwargs)
    with pytest.raises(ValueError, match="v has 5 entries, expected 12"):
        op.matvec(np.ones(5))
    with pytest.raises(ValueError, match="k is required"):
        ntkcore.spectrum(op)


# -- per-layer kernels -----------------------------------------------------------------------
PER_LAYER = [
    (case, impl)
    for case in ("mlp", "lowrank", "batchnorm_frozen")
    for impl in ("jacobian_contraction", "ntk_vector_products", "structured", "auto")
] + [("transformer", "structured"), ("transformer", "jacobian_contraction")]


@pytest.mark.filterwarnings("ignore::ntkcore.StructuredFallbackWarning")  # lowrank and tied-embedding fallbacks
@pytest.mark.parametrize(("case", "implementation"), PER_LAYER)
def test_per_layer_kernels_sum_to_the_kernel(backend, zoo, case, implementation):
    x1, x2 = inputs(case)
    options = {"implementation": implementation, "trace_axes": (-1,)}
    parts = _kernel(zoo, case, x1, x2, per_layer=True, **options)
    _, prepared = _prepared(backend, zoo, case)
    assert list(parts) == list(dict.fromkeys(layer_name(n) for n in prepared.params))
    total = sum(zoo.to_numpy(p) for p in parts.values())
    _close(total, zoo.to_numpy(_kernel(zoo, case, x1, x2, **options)))


def test_per_layer_refuses_tiling(zoo):
    x1, _ = inputs("mlp")
    with pytest.raises(ValueError, match=r"per_layer=True .* cannot be tiled"):
        _kernel(zoo, "mlp", x1, per_layer=True, batch_size=2)


# -- the linearised model --------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp", "batchnorm_frozen"])
def test_linearized_model(zoo, case):
    x1, _ = inputs(case)
    built = zoo.build(case, DTYPE)
    lin = ntkcore.linearize(built.model, built.kwargs.get("params"))
    x = zoo.to_native(x1, DTYPE)
    at_zero = lin(x)
    assert zoo.is_native(at_zero, DTYPE)
    _close(zoo.to_numpy(at_zero), zoo.to_numpy(zoo.forward(built, x1)))
    rng = np.random.default_rng(3)
    direction = {k: rng.normal(size=tuple(p.shape)) for k, p in lin.params0.items()}

    def gap(eps: float) -> float:
        point = {k: p + zoo.to_native(eps * direction[k], DTYPE) for k, p in lin.params0.items()}
        return float(np.abs(zoo.to_numpy(lin(x, point)) - zoo.to_numpy(lin.model(x, point))).max())

    # f − f_lin is the second-order Taylor term: it shrinks 4× when the step halves (3–5 allows
    # the third-order term at this step size), and is far below the first-order change
    big, small = gap(1e-3), gap(5e-4)
    assert 3.0 < big / small < 5.0
    assert big < 1e-3 * float(np.abs(zoo.to_numpy(at_zero)).max())


def test_taylor_expand_against_finite_differences(zoo):
    """Each order's term T_k − T_{k−1} at θ0 + δ equals g^(k)(0)/k! for g(t) = f(θ0 + tδ), the
    derivatives by central finite differences of the real model, on a smooth model (dense,
    LayerNorm, tanh: a ReLU's kinks would break the differences). With |δ| = 0.5 and h = 1e-2
    the differences' error is O((h·|δ|)²) ≈ 1e-5 of each term; 1e-3 leaves room for that."""
    x1, _ = inputs("layernorm")
    built = zoo.build("layernorm", DTYPE)
    params = built.kwargs.get("params")
    expansions = [ntkcore.taylor_expand(built.model, degree, params) for degree in range(4)]
    x = zoo.to_native(x1, DTYPE)
    rng = np.random.default_rng(4)
    direction = {k: rng.normal(size=tuple(p.shape)) for k, p in expansions[0].params0.items()}
    norm = np.sqrt(sum(float((d**2).sum()) for d in direction.values()))
    direction = {k: 0.5 * d / norm for k, d in direction.items()}

    def at(t: float) -> dict:
        return {k: p + zoo.to_native(t * direction[k], DTYPE) for k, p in expansions[0].params0.items()}

    h = 1e-2
    g = {i: zoo.to_numpy(expansions[0].model(x, at(i * h))) for i in range(-2, 3)}
    derivatives = [
        g[0],
        (g[1] - g[-1]) / (2 * h),
        (g[1] - 2 * g[0] + g[-1]) / h**2,
        (g[2] - 2 * g[1] + 2 * g[-1] - g[-2]) / (2 * h**3),
    ]
    values = [zoo.to_numpy(expansion(x, at(1.0))) for expansion in expansions]
    np.testing.assert_allclose(values[0], g[0], rtol=1e-12)  # degree 0: f(θ0)
    for k in range(1, 4):
        term = derivatives[k] / math.factorial(k)
        np.testing.assert_allclose(values[k] - values[k - 1], term, rtol=0, atol=1e-3 * np.abs(term).max(), err_msg=k)
    lin = ntkcore.linearize(built.model, params)
    np.testing.assert_allclose(values[1], zoo.to_numpy(lin(x, at(1.0))), rtol=1e-12)
    with pytest.raises(ValueError, match="degree must be an integer ≥ 0"):
        ntkcore.taylor_expand(built.model, -1, params)


# -- predictions -----------------------------------------------------------------------------
def test_gradient_descent_with_a_loss_function(zoo):
    """A loss written with the framework's own arrays is differentiated by the framework: ½‖f − y‖²
    as a function gives gd_mse's gradient flow."""
    from ntkcore._xp import namespace_of

    x1, _ = inputs("mlp")
    built = zoo.build("mlp", DTYPE)
    k = ntkcore.ntk(built.model, zoo.to_native(x1, DTYPE), trace_axes=(-1,), **built.kwargs)
    y = zoo.to_native(np.random.default_rng(0).normal(size=(k.shape[0], 3)), DTYPE)
    eta = 0.5 * ntkcore.max_learning_rate(k) / 2

    def loss(f, target):
        return namespace_of(f).sum((f - target) ** 2) / 2

    got = ntkcore.gradient_descent(loss, k, y, 3.0, learning_rate=eta)
    assert zoo.is_native(got.train, DTYPE)
    expected = ntkcore.gd_mse(k, y, 3.0, learning_rate=eta).train
    expected = zoo.to_numpy(expected)  # RK4 at a tenth of its stability bound: ~1e-6 of the largest entry
    np.testing.assert_allclose(zoo.to_numpy(got.train), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("traced", [False, True], ids=["full", "trace"])
def test_gd_mse_at_infinity_is_kernel_regression(zoo, traced):
    x1, x2 = inputs("mlp")
    options = {"trace_axes": (-1,)} if traced else {}
    k_train = _kernel(zoo, "mlp", x1, **options)
    k_test = _kernel(zoo, "mlp", x2, x1, **options)
    y = zoo.to_native(np.random.default_rng(4).normal(size=(len(x1), 3)), DTYPE)
    prediction = ntkcore.gd_mse(k_train, y, math.inf, k_test_train=k_test)
    assert zoo.is_native(prediction.test, DTYPE)
    _close(zoo.to_numpy(prediction.train), zoo.to_numpy(y), 1e-7)  # interpolation; cond(Θ) ≈ 1e2
    _close(zoo.to_numpy(prediction.test), zoo.to_numpy(ntkcore.kernel_regression(k_train, y, k_test)), 1e-7)
    times = ntkcore.gd_mse(k_train, y, [0.0, 1.0, math.inf], k_test_train=k_test, learning_rate=0.01)
    assert tuple(times.train.shape) == (3, len(x1), 3)
    # at t = 0 the outputs are f0 = 0 (up to rounding relative to y)
    assert np.abs(zoo.to_numpy(times.train[0])).max() <= EXACT * np.abs(zoo.to_numpy(y)).max()


def test_predicted_training_tracks_gradient_descent(backend, zoo):
    """A 512-wide MLP trained by 10 steps of full-batch gradient descent on ½‖f − y‖² at
    η = 0.1·(2/λ_max): the kernel's prediction of the training outputs tracks the real ones.

    The gap is the network's departure from its linearisation, which shrinks with the width;
    at width 512 it measures 1.1e-4 of the change (torch and JAX alike), and 1% is allowed.
    """
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(8, 6)), rng.normal(size=(8, 3))
    adapter, prepared = _prepared(backend, zoo, "wide")
    kernel = _kernel(zoo, "wide", x)
    eta = 0.1 * ntkcore.max_learning_rate(kernel)
    xn, yn = zoo.to_native(x, DTYPE), zoo.to_native(y, DTYPE)
    params = dict(prepared.params)
    f0 = prepared.apply(params, xn)
    for _ in range(10):
        out, pullback = adapter.vjp(lambda p: prepared.apply(p, xn), params)
        gradient = pullback(out - yn)
        params = {k: params[k] - eta * gradient[k] for k in params}
    trained = zoo.to_numpy(prepared.apply(params, xn))
    predicted = ntkcore.gd_mse(kernel, yn, 10, f0_train=f0, learning_rate=eta, discrete=True).train
    change = np.abs(trained - zoo.to_numpy(f0)).max()
    assert change > 0.1  # training moved the outputs
    assert np.abs(trained - zoo.to_numpy(predicted)).max() <= 0.01 * change


def test_learning_rate_alignment_and_drift(zoo):
    x1, _ = inputs("mlp")
    kernel = _kernel(zoo, "mlp", x1, trace_axes=(-1,))
    matrix = zoo.to_numpy(kernel)
    assert ntkcore.max_learning_rate(kernel) == pytest.approx(2 / np.linalg.eigvalsh(matrix)[-1])
    y = np.random.default_rng(6).normal(size=(len(x1), 3))
    target = y @ y.T
    expected = (matrix * target).sum() / (np.linalg.norm(matrix) * np.linalg.norm(target))
    assert ntkcore.alignment(kernel, zoo.to_native(y, DTYPE)) == pytest.approx(expected)
    assert ntkcore.drift(kernel * 1.5, kernel) == pytest.approx(0.5)


# -- bad inputs ------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(zoo):
    x1, x2 = inputs("mlp")
    rectangular = _kernel(zoo, "mlp", x1, x2, trace_axes=(-1,))
    with pytest.raises(ValueError, match=r"not square as a matrix \(4×3\)"):
        ntkcore.spectrum(rectangular)
    with pytest.raises(ValueError, match="not symmetric"):
        ntkcore.spectrum(zoo.to_native(np.arange(16.0).reshape(4, 4), DTYPE))
    with pytest.raises(ValueError, match="diagonal_axes"):
        ntkcore.spectrum(_kernel(zoo, "mlp", x1, diagonal_axes=(0,)))
    kernel = _kernel(zoo, "mlp", x1, trace_axes=(-1,))
    y = zoo.to_native(np.zeros((len(x1), 3)), DTYPE)
    with pytest.raises(ValueError, match="t must be ≥ 0"):
        ntkcore.gd_mse(kernel, y, -1.0)
    with pytest.raises(ValueError, match="y_train has shape \\(3, 3\\), expected a leading axis of 4"):
        ntkcore.gd_mse(kernel, zoo.to_native(np.zeros((3, 3)), DTYPE), 1.0)
    full = _kernel(zoo, "mlp", x1)
    with pytest.raises(ValueError, match="y_train has per-example shape \\(2,\\)"):
        ntkcore.gd_mse(full, zoo.to_native(np.zeros((4, 2)), DTYPE), 1.0)
    with pytest.raises(ValueError, match="k_test_train has shape"):
        ntkcore.gd_mse(kernel, y, 1.0, k_test_train=full)
    with pytest.raises(ValueError, match="f0_train has shape"):
        ntkcore.gd_mse(kernel, y, 1.0, f0_train=zoo.to_native(np.zeros((4, 2)), DTYPE))
