"""The analysis tools with no framework: array-api-strict (proving the core uses only the
array API) and numpy, checked against closed forms and explicit iteration.

Float64 throughout; "exact" comparisons allow 1e-10 relative (6×6 eigendecompositions and
solves round near 1e-15; the condition number here is about 1e2).
"""

from __future__ import annotations

import math

import array_api_strict as xp
import numpy as np
import pytest

import ntkcore

RTOL = 1e-10


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    return a @ a.T, rng.normal(size=(6, 2)), rng.normal(size=(3, 6))


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1.0)


def test_predictions_stay_in_the_array_api(problem):
    k, y, k_test = (xp.asarray(a) for a in problem)
    result = ntkcore.gd_mse(k, y, [0.0, 2.0, math.inf], k_test_train=k_test, learning_rate=0.01)
    assert isinstance(result.train, type(k)) and tuple(result.test.shape) == (3, 3, 2)
    _close(result.train[2, ...], y)  # interpolation at t = ∞
    _close(result.test[2, ...], ntkcore.kernel_regression(k, y, k_test))
    assert isinstance(ntkcore.spectrum(k).eigenvalues, type(k))


def test_gd_mse_matches_explicit_gradient_descent(problem):
    k, y, k_test = problem
    eta, steps = 0.01, 7
    f, f_test = np.zeros_like(y), np.zeros((3, 2))
    for _ in range(steps):  # the linearised model: f ← f − η Θ (f − y), and the test outputs alike
        f, f_test = f - eta * k @ (f - y), f_test - eta * k_test @ (f - y)
    result = ntkcore.gd_mse(k, y, steps, k_test_train=k_test, learning_rate=eta, discrete=True)
    _close(result.train, f)
    _close(result.test, f_test)
    # gradient flow: f_t = y − exp(−ηΘt)(y − f0), by scipy's expm
    from scipy.linalg import expm

    flow = ntkcore.gd_mse(k, y, 3.0, learning_rate=eta, f0_train=np.ones_like(y))
    _close(flow.train, y - expm(-eta * 3.0 * k) @ (y - 1.0), 1e-9)


def test_ridge_and_full_kernels(problem):
    k, y, k_test = problem
    _close(ntkcore.kernel_regression(k, y, k_test, diag_reg=0.5), k_test @ np.linalg.solve(k + 0.5 * np.eye(6), y))
    # a full kernel (N, N, O, O) = Θ ⊗ I_O gives the same predictions as the shared (N, N) one
    full = np.einsum("ij,ab->ijab", k, np.eye(2))
    full_test = np.einsum("ij,ab->ijab", k_test, np.eye(2))
    _close(
        ntkcore.gd_mse(full, y, 5.0, k_test_train=full_test, learning_rate=0.01).test,
        ntkcore.gd_mse(k, y, 5.0, k_test_train=k_test, learning_rate=0.01).test,
    )


def test_spectrum_statistics(problem):
    k, _, _ = problem
    values = np.linalg.eigvalsh(k)
    result = ntkcore.spectrum(k)
    assert result.condition_number == pytest.approx(values[-1] / values[0])
    p = values / values.sum()
    assert result.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert ntkcore.spectrum(np.zeros((3, 3))).condition_number == math.inf
    assert "λ_min" in str(result)


def test_plots_return_figures(problem):
    import matplotlib

    matplotlib.use("Agg")
    import ntkcore.plot

    k, _, _ = problem
    fig = ntkcore.plot.spectrum(k, label="random")
    assert fig.axes and fig.axes[0].get_yscale() == "log"
    assert len(ntkcore.plot.kernel(k).axes) == 2  # image and colour bar
    full = np.einsum("ij,ab->ijab", k, np.eye(2))
    assert ntkcore.plot.kernel(full).axes[0].images[0].get_array().shape == (12, 12)


def test_argument_errors(problem):
    k, y, _ = problem
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        ntkcore.gd_mse(k, y, 1.0, learning_rate=0.0)
    with pytest.raises(ValueError, match="t must be ≥ 0"):
        ntkcore.gd_mse(k, y, [1.0, float("nan")])
    with pytest.raises(ValueError, match="diag_reg must be ≥ 0"):
        ntkcore.kernel_regression(k, y, diag_reg=-1.0)
    with pytest.raises(ValueError, match='which must be "largest"'):
        ntkcore.spectrum(k, k=2, which="top")
    with pytest.raises(ValueError, match="k must be a positive number"):
        ntkcore.spectrum(k, k=0)
    with pytest.raises(ValueError, match="kernel_t has shape"):
        ntkcore.drift(k, k[:3, :3])
    with pytest.raises(TypeError, match="kernel must be an array"):
        ntkcore.spectrum([[1.0]])


def test_gp_inference_is_the_gaussian_posterior(problem):
    """Mean K*ₜ(K + λI)⁻¹y and covariance K** − K*ₜ(K + λI)⁻¹Kₜ*, against numpy, for a kernel
    shared by the outputs and for the same kernel written in full (Θ ⊗ I)."""
    k, y, k_test = problem
    rng = np.random.default_rng(1)
    joint = rng.normal(size=(9, 9))
    joint = joint @ joint.T  # a prior over 6 training and 3 test points
    k, k_test, k_tt = joint[:6, :6], joint[6:, :6], joint[6:, 6:]
    inverse = np.linalg.inv(k + 0.3 * np.eye(6))
    post = ntkcore.gp_inference(k, y, k_test, k_tt, diag_reg=0.3)
    _close(post.mean, k_test @ inverse @ y, 1e-9)
    _close(post.covariance, k_tt - k_test @ inverse @ k_test.T, 1e-9)
    assert ntkcore.gp_inference(k, y, k_test, diag_reg=0.3).covariance is None
    train = ntkcore.gp_inference(k, y, diag_reg=0.3)
    _close(train.covariance, k - k @ inverse @ k, 1e-9)
    full = lambda a: np.einsum("ij,ab->ijab", a, np.eye(2))  # noqa: E731
    posterior = ntkcore.gp_inference(full(k), y, full(k_test), full(k_tt), diag_reg=0.3)
    _close(posterior.mean, post.mean, 1e-9)
    _close(posterior.covariance, full(post.covariance), 1e-9)
    with pytest.raises(ValueError, match=r"k_test_test has shape \(2, 2\), expected \(3, 3\)"):
        ntkcore.gp_inference(k, y, k_test, k_tt[:2, :2])


def _euler(rate, state, t, dt=1e-3):
    """Explicit steps of the same dynamics, small enough to stand for the flow (error O(dt))."""
    for _ in range(round(t / dt)):
        state = [s + dt * r for s, r in zip(state, rate(state))]
    return state


def test_gradient_descent_for_mse_is_gd_mse(problem):
    k, y, k_test = problem
    eta = 0.5 / np.linalg.eigvalsh(k).max()
    flow = ntkcore.gradient_descent("mse", k, y, [3.0, 0.0, 10.0], k_test_train=k_test, learning_rate=eta)
    closed = ntkcore.gd_mse(k, y, [3.0, 0.0, 10.0], k_test_train=k_test, learning_rate=eta)
    # RK4 at a tenth of its stability bound: ~1e-6 relative error, against the exact exponential
    _close(flow.train, closed.train, 1e-5)
    _close(flow.test, closed.test, 1e-5)


def test_gradient_descent_cross_entropy_and_momentum_against_explicit_steps(problem):
    k, _, k_test = problem
    rng = np.random.default_rng(2)
    labels = np.eye(2)[rng.integers(0, 2, size=6)]
    eta = 0.5 / np.linalg.eigvalsh(k).max()

    def softmax(f):
        e = np.exp(f - f.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def flow(state):  # df/dt = −η Θ (softmax(f) − y), for train and test
        g = softmax(state[0]) - labels
        return [-eta * k @ g, -eta * k_test @ g]

    expected = _euler(flow, [np.zeros((6, 2)), np.zeros((3, 2))], 4.0)
    got = ntkcore.gradient_descent("cross_entropy", k, labels, 4.0, k_test_train=k_test, learning_rate=eta)
    _close(got.train, expected[0], 2e-3)
    _close(got.test, expected[1], 2e-3)

    def heavy_ball(state):  # df/dt = u, du/dt = −(1 − m) u − η Θ ∇L
        f, _, u, u_test = state
        g = softmax(f) - labels
        return [u, u_test, -(1 - 0.9) * u - eta * k @ g, -(1 - 0.9) * u_test - eta * k_test @ g]

    zeros = [np.zeros((6, 2)), np.zeros((3, 2))]
    expected = _euler(heavy_ball, zeros + zeros, 4.0)
    got = ntkcore.gradient_descent(
        "cross_entropy", k, labels, 4.0, k_test_train=k_test, learning_rate=eta, momentum=0.9
    )
    _close(got.train, expected[0], 2e-3)
    _close(got.test, expected[1], 2e-3)
    with pytest.raises(TypeError, match="differentiated by the kernel's framework"):
        ntkcore.gradient_descent(lambda f, y: ((f - y) ** 2).sum(), k, labels, 1.0)
    with pytest.raises(ValueError, match="momentum must be in"):
        ntkcore.gradient_descent("mse", k, labels, 1.0, momentum=1.0)
