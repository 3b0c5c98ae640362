"""Predictions from an empirical kernel: gradient-descent dynamics for MSE (closed form) and for
any loss, with or without momentum (integrated), kernel ridge regression, Gaussian-process
inference, the largest stable learning rate, kernel–target
alignment and kernel drift.

Convention: training minimises L(θ) = ½ Σ_i ‖f(θ, x_i) − y_i‖² (a sum over training examples
and outputs) by θ ← θ − η ∇L. For the linearised model the training outputs then follow
f_{s+1} = f_s − η Θ (f_s − y), so gradient descent is stable for η < 2/λ_max(Θ). A loss
averaged over m examples is the same with η/m in place of η.

Kernels are Θ(x_train, x_train) of shape (N, N) (one kernel shared by every output: a kernel
computed with ``trace_axes``) or (N, N, *out, *out) (the full kernel), and Θ(x_test, x_train)
of shape (M, N) or (M, N, *out, *out) alike; targets and outputs are (N, *out). Everything
runs in the kernel's own framework (its ``eigh`` and ``solve``) and returns its arrays.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ._xp import namespace_of
from .spectra import symmetric_matrix


class Prediction(NamedTuple):
    """Outputs on the training set and (when a test kernel was given) on the test set, shaped
    like the targets, with a leading time axis when ``t`` was a sequence."""

    train: Any
    test: Any | None


def _targets(xp: Any, matrix: Any, kernel: Any, y: Any, name: str) -> tuple[Any, tuple[int, ...], bool]:
    """``(Y, y's shape, shared)``: the targets as the columns the kernel matrix acts on.

    ``shared`` (an (N, N) kernel): Y is (N, C) and the same kernel applies to each of C
    outputs; otherwise Y is one column of N·O entries matching the flattened full kernel.
    """
    n = kernel.shape[0]
    shape = tuple(y.shape)
    if len(shape) == 0 or shape[0] != n:
        raise ValueError(f"{name} has shape {shape}, expected a leading axis of {n} training examples (the kernel's)")
    if len(kernel.shape) == 2:
        return xp.reshape(y, (n, math.prod(shape[1:]))), shape, True
    out = tuple(kernel.shape[2 : 2 + (len(kernel.shape) - 2) // 2])
    if shape[1:] != out:
        raise ValueError(f"{name} has per-example shape {shape[1:]}, but the full kernel has outputs {out}")
    return xp.reshape(y, (matrix.shape[0], 1)), shape, False


def _test_matrix(xp: Any, k_test_train: Any, k_train: Any) -> Any:
    """Θ(x_test, x_train) as the matrix (M·O, N·O) (or (M, N)), checked against k_train."""
    from .api import flatten

    n = k_train.shape[0]
    shape = tuple(k_test_train.shape)
    if len(shape) != len(k_train.shape) or shape[1] != n or shape[2:] != tuple(k_train.shape[2:]):
        raise ValueError(
            f"k_test_train has shape {shape}, expected (M, {n}, ...) with the axes of k_train {tuple(k_train.shape)}"
        )
    return k_test_train if len(shape) == 2 else flatten(k_test_train)


def _check_shape(array: Any | None, name: str, expected: tuple[int, ...]) -> None:
    if array is not None and tuple(array.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {expected}")


def _times(t: Any) -> tuple[list[float], bool]:
    """The times as floats, and whether ``t`` was a sequence (a leading time axis)."""
    sequence = not isinstance(t, (int, float))
    values = [float(v) for v in (t if sequence else [t])]
    for v in values:
        if not v >= 0:  # also refuses nan
            raise ValueError(f"t must be ≥ 0 (a number of steps, or inf), got {v}")
    return values, sequence


def gd_mse(
    k_train: Any,
    y_train: Any,
    t: Any = math.inf,
    *,
    k_test_train: Any = None,
    f0_train: Any = None,
    f0_test: Any = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    discrete: bool = False,
) -> Prediction:
    """Outputs of the linearised model after training by gradient descent on MSE for time ``t``.

    With Θ + diag_reg·I = V Λ Vᵀ and residual r₀ = y − f₀: train f_t = y − V D_t Vᵀ r₀ and
    test f_t = f₀_test + Θ_test,train V Λ⁻¹ (I − D_t) Vᵀ r₀, where D_t = exp(−η Λ t) (gradient
    flow; ``discrete=True``: (I − η Λ)^t, exactly ``t`` steps). ``t`` is a number of steps (a
    float, ``inf``, or a sequence of them); ``f0_*`` are the outputs at initialisation (default
    zero). At t = ∞ the test prediction is kernel ridge regression on the residuals.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if diag_reg < 0:
        raise ValueError(f"diag_reg must be ≥ 0, got {diag_reg}")
    times, sequence = _times(t)
    xp, matrix = symmetric_matrix(k_train, "k_train")
    targets, y_shape, _ = _targets(xp, matrix, k_train, y_train, "y_train")
    _check_shape(f0_train, "f0_train", y_shape)
    residual = targets if f0_train is None else targets - xp.reshape(f0_train, tuple(targets.shape))
    if diag_reg:
        matrix = matrix + diag_reg * xp.eye(matrix.shape[0], dtype=matrix.dtype)
    values, vectors = xp.linalg.eigh(matrix)
    top = float(xp.max(values))
    if discrete and learning_rate * top >= 2:
        raise ValueError(
            f"learning_rate={learning_rate:g} is at or above max_learning_rate(k_train) = 2/λ_max = {2 / top:.3g}: "
            "discrete gradient descent diverges (|1 − ηλ| ≥ 1). Use a smaller learning_rate, or discrete=False "
            "for gradient flow"
        )
    vt = xp.permute_dims(vectors, (1, 0))
    projected = xp.matmul(vt, residual)  # Vᵀ r₀, (M, C)
    test = None
    if k_test_train is not None:
        test = _test_matrix(xp, k_test_train, k_train)
        m = k_test_train.shape[0]
        test_shape = (m, *y_shape[1:])
        _check_shape(f0_test, "f0_test", test_shape)
        k_test_v = xp.matmul(test, vectors)
    scale = float(xp.max(xp.abs(values)))
    positive = values > scale * _rank_rtol(values)
    safe = xp.where(positive, values, xp.ones(values.shape, dtype=values.dtype))
    trains, tests = [], []
    for time in times:
        if discrete:
            if math.isinf(time):
                decay = xp.zeros(values.shape, dtype=values.dtype)
            else:
                decay = (1 - learning_rate * values) ** time
        else:
            zero = xp.zeros(values.shape, dtype=values.dtype)
            decay = zero if math.isinf(time) else xp.exp(-learning_rate * time * values)
        decay = xp.where(positive, decay, xp.ones(values.shape, dtype=values.dtype))  # null space: no change
        train = targets - xp.matmul(vectors, decay[:, None] * projected)
        trains.append(xp.reshape(train, y_shape))
        if test is not None:
            gain = xp.where(positive, (1 - decay) / safe, xp.zeros(values.shape, dtype=values.dtype))
            out = xp.matmul(k_test_v, gain[:, None] * projected)
            out = xp.reshape(out, test_shape)
            tests.append(out if f0_test is None else out + f0_test)
    if sequence:
        return Prediction(xp.stack(trains, axis=0), xp.stack(tests, axis=0) if tests else None)
    return Prediction(trains[0], tests[0] if tests else None)


def _loss_gradient(loss: Any, xp: Any, like: Any) -> Any:
    """∇_f L as a function of (f, y), both shaped like the targets: named losses in closed form,
    a callable ``loss(f, y) -> scalar`` differentiated by the kernel's framework."""
    if loss == "mse":  # L = ½ Σ ‖f − y‖²
        return lambda f, y: f - y
    if loss == "cross_entropy":  # L = −Σ y · log softmax(f) over the last axis, y probabilities

        def gradient(f: Any, y: Any) -> Any:
            e = xp.exp(f - xp.max(f, axis=-1, keepdims=True))
            return e / xp.sum(e, axis=-1, keepdims=True) * xp.sum(y, axis=-1, keepdims=True) - y

        return gradient
    if not callable(loss):
        raise ValueError(f"loss must be 'mse', 'cross_entropy' or a function loss(f, y) -> scalar, got {loss!r}")
    from .registry import backend_for_arrays

    backend = backend_for_arrays(like)
    if backend is None:
        raise TypeError("a loss function is differentiated by the kernel's framework: pass a framework's kernel, "
                        "or loss='mse' / 'cross_entropy' for numpy kernels")  # fmt: skip
    return lambda f, y: backend.vjp(lambda p: loss(p["f"], y), {"f": f})[1](xp.ones((), dtype=f.dtype))["f"]


def gradient_descent(
    loss: Any,
    k_train: Any,
    y_train: Any,
    t: Any,
    *,
    k_test_train: Any = None,
    f0_train: Any = None,
    f0_test: Any = None,
    learning_rate: float = 1.0,
    momentum: float | None = None,
) -> Prediction:
    """Outputs of the linearised model trained on a general loss, by integrating its function-space
    dynamics (Runge–Kutta 4, steps well inside its stability region) in the kernel's framework.

    Gradient flow: df/dt = −η Θ ∇_f L(f), and the test outputs df*/dt = −η Θ*,train ∇_f L(f), with
    t counted in steps as for :func:`gd_mse` (``loss="mse"`` gives its ``discrete=False``
    prediction). ``momentum=m``: heavy ball in continuous time, df/dt = u, du/dt = −(1 − m) u −
    η Θ ∇_f L(f) (a constant gradient moves f at η/(1 − m) per step, as the discrete method).
    ``loss``: ``"mse"`` (½ Σ ‖f − y‖²), ``"cross_entropy"`` (softmax over the last axis, y
    probabilities) or a function ``loss(f, y)`` of the kernel's arrays."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if momentum is not None and not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    times, sequence = _times(t)
    if any(math.isinf(time) for time in times):
        raise ValueError("t must be finite for gradient_descent (gd_mse gives MSE's t = inf in closed form)")
    xp, matrix = symmetric_matrix(k_train, "k_train")
    targets, y_shape, _ = _targets(xp, matrix, k_train, y_train, "y_train")
    _check_shape(f0_train, "f0_train", y_shape)
    gradient = _loss_gradient(loss, xp, k_train)
    test = None if k_test_train is None else _test_matrix(xp, k_test_train, k_train)
    test_shape = None if test is None else (k_test_train.shape[0], *y_shape[1:])
    if test is not None:
        _check_shape(f0_test, "f0_test", test_shape)
    zero = xp.zeros(y_shape, dtype=matrix.dtype)
    state = [zero if f0_train is None else f0_train + zero]
    if test is not None:
        state.append(
            xp.zeros(test_shape, dtype=matrix.dtype)
            if f0_test is None
            else f0_test + xp.zeros(test_shape, dtype=matrix.dtype)
        )
    if momentum is not None:
        state += [xp.zeros_like(s) for s in state]
    parts = len(state) // (1 if momentum is None else 2)

    def rate(values: list) -> list:
        g = xp.reshape(gradient(values[0], y_train), tuple(targets.shape))
        pull = [-learning_rate * xp.reshape(xp.matmul(matrix, g), y_shape)]
        if test is not None:
            pull.append(-learning_rate * xp.reshape(xp.matmul(test, g), test_shape))
        if momentum is None:
            return pull
        velocity = values[parts:]
        return [*velocity, *(p - (1 - momentum) * v for p, v in zip(pull, velocity))]

    # RK4 is stable for |λ·dt| < 2.78: the fastest mode of the linearised dynamics is ηλ_max (and
    # √(ηλ_max) for momentum's oscillation); a tenth of that bound (local error ~1e-5), at most a step per unit
    stiff = learning_rate * max(float(xp.max(xp.linalg.eigvalsh(matrix))), 1e-300)
    dt_max = min(1.0, 0.25 / stiff, 0.25 / math.sqrt(stiff))
    results: dict[int, list] = {}
    now = 0.0
    for index in sorted(range(len(times)), key=times.__getitem__):  # integrate forward through the times
        steps = math.ceil((times[index] - now) / dt_max) if times[index] > now else 0
        dt = (times[index] - now) / steps if steps else 0.0
        for _ in range(steps):
            k1 = rate(state)
            k2 = rate([s + dt / 2 * k for s, k in zip(state, k1)])
            k3 = rate([s + dt / 2 * k for s, k in zip(state, k2)])
            k4 = rate([s + dt * k for s, k in zip(state, k3)])
            state = [s + dt / 6 * (a + 2 * b + 2 * c + d) for s, a, b, c, d in zip(state, k1, k2, k3, k4)]
        now = max(now, times[index])
        results[index] = state[:parts]
    trains = [results[i][0] for i in range(len(times))]
    tests = [results[i][1] for i in range(len(times))] if test is not None else []
    if sequence:
        return Prediction(xp.stack(trains, axis=0), xp.stack(tests, axis=0) if tests else None)
    return Prediction(trains[0], tests[0] if tests else None)


def _rank_rtol(values: Any) -> float:
    """Eigenvalues below this fraction of the largest count as zero (the pseudo-inverse's cut):
    the size times the dtype's machine epsilon, as numpy's matrix_rank."""
    eps = 2.2e-16 if "64" in str(values.dtype) else 1.2e-7
    return values.shape[0] * eps


def kernel_regression(k_train: Any, y_train: Any, k_test_train: Any = None, *, diag_reg: float = 0.0) -> Any:
    """Kernel ridge regression: Θ_test,train (Θ + diag_reg·I)⁻¹ y, by a direct solve (the training
    set's own predictions when ``k_test_train`` is None)."""
    if diag_reg < 0:
        raise ValueError(f"diag_reg must be ≥ 0, got {diag_reg}")
    xp, matrix = symmetric_matrix(k_train, "k_train")
    targets, y_shape, _ = _targets(xp, matrix, k_train, y_train, "y_train")
    if diag_reg:
        matrix = matrix + diag_reg * xp.eye(matrix.shape[0], dtype=matrix.dtype)
    alpha = xp.linalg.solve(matrix, targets)
    if k_test_train is None:
        return xp.reshape(xp.matmul(matrix, alpha), y_shape)
    test = _test_matrix(xp, k_test_train, k_train)
    return xp.reshape(xp.matmul(test, alpha), (k_test_train.shape[0], *y_shape[1:]))


class Posterior(NamedTuple):
    """A Gaussian process posterior: ``mean`` shaped like the targets (M, *out); ``covariance``
    (M, M) for a kernel shared by the outputs, (M, M, *out, *out) for a full one, or ``None``
    when test points were given without ``k_test_test``."""

    mean: Any
    covariance: Any | None


def _unflatten(xp: Any, matrix: Any, m: int, out: tuple[int, ...]) -> Any:
    """An (M·O, M·O) matrix back to the kernel layout (M, M, *out, *out)."""
    k = len(out)
    blocks = xp.reshape(matrix, (m, *out, m, *out))
    return xp.permute_dims(blocks, (0, 1 + k, *range(1, 1 + k), *range(2 + k, 2 + 2 * k)))


def gp_inference(
    k_train: Any, y_train: Any, k_test_train: Any = None, k_test_test: Any = None, *, diag_reg: float = 0.0
) -> Posterior:
    """The posterior of a Gaussian process whose prior covariance is the kernel (the NNGP kernel,
    or the NTK: the NTK-GP's mean is the infinitely trained linearised network's prediction)
    given targets observed with noise variance ``diag_reg``: mean K*ₜ (K + λI)⁻¹ y and covariance
    K** − K*ₜ (K + λI)⁻¹ Kₜ*. Without test kernels, the posterior on the training inputs."""
    if diag_reg < 0:
        raise ValueError(f"diag_reg must be ≥ 0, got {diag_reg}")
    xp, matrix = symmetric_matrix(k_train, "k_train")
    targets, y_shape, shared = _targets(xp, matrix, k_train, y_train, "y_train")
    regularised = matrix + diag_reg * xp.eye(matrix.shape[0], dtype=matrix.dtype) if diag_reg else matrix
    test = matrix if k_test_train is None else _test_matrix(xp, k_test_train, k_train)
    m = k_train.shape[0] if k_test_train is None else k_test_train.shape[0]
    solved = xp.linalg.solve(regularised, xp.concat([targets, xp.permute_dims(test, (1, 0))], axis=1))
    columns = targets.shape[1]
    mean = xp.reshape(xp.matmul(test, solved[:, :columns]), (m, *y_shape[1:]))
    if k_test_train is not None and k_test_test is None:
        return Posterior(mean, None)
    if k_test_test is None:
        prior = matrix
    else:
        _check_shape(k_test_test, "k_test_test", (m, m, *tuple(k_train.shape[2:])))
        prior = symmetric_matrix(k_test_test, "k_test_test")[1]
    covariance = prior - xp.matmul(test, solved[:, columns:])
    return Posterior(mean, covariance if shared else _unflatten(xp, covariance, m, tuple(y_shape[1:])))


def max_learning_rate(k_train: Any) -> float:
    """2 / λ_max(Θ): gradient descent on L = ½ Σ ‖f − y‖² diverges above it (linearised model)."""
    xp, matrix = symmetric_matrix(k_train, "k_train")
    top = float(xp.max(xp.linalg.eigvalsh(matrix)))
    if top <= 0:
        raise ValueError("k_train has no positive eigenvalue: every learning rate is stable")
    return 2.0 / top


def alignment(kernel: Any, y: Any, *, centered: bool = False) -> float:
    """Kernel–target alignment ⟨K, y yᵀ⟩_F / (‖K‖_F ‖y yᵀ‖_F) (Cristianini et al. 2002).

    ``centered=True`` centres both matrices first (Cortes et al. 2012). An (N, N) kernel is
    aligned with Y Yᵀ over examples (Y: (N, C)); a full kernel with the flattened y.
    """
    xp, matrix = symmetric_matrix(kernel, "kernel")
    targets, _, _ = _targets(xp, matrix, kernel, y, "y")
    target = xp.matmul(targets, xp.permute_dims(targets, (1, 0)))
    if centered:
        n = matrix.shape[0]
        h = xp.eye(n, dtype=matrix.dtype) - xp.ones((n, n), dtype=matrix.dtype) / n
        matrix, target = xp.matmul(xp.matmul(h, matrix), h), xp.matmul(xp.matmul(h, target), h)
    inner = float(xp.sum(matrix * target))
    norms = math.sqrt(float(xp.sum(matrix * matrix)) * float(xp.sum(target * target)))
    if norms == 0:
        raise ValueError("alignment is undefined for a zero kernel or zero targets")
    return inner / norms


def drift(kernel_t: Any, kernel_0: Any) -> float:
    """Relative kernel change ‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F (how far training left the lazy regime)."""
    if tuple(kernel_t.shape) != tuple(kernel_0.shape):
        raise ValueError(f"kernel_t has shape {tuple(kernel_t.shape)} but kernel_0 has {tuple(kernel_0.shape)}")
    xp = namespace_of(kernel_t, kernel_0)
    base = math.sqrt(float(xp.sum(kernel_0 * kernel_0)))
    if base == 0:
        raise ValueError("kernel_0 is zero: the relative drift is undefined")
    diff = kernel_t - kernel_0
    return math.sqrt(float(xp.sum(diff * diff))) / base


def kernel_drift(model: Any, x: Any, params_0: Any, params_t: Any, **options: Any) -> float:
    """:func:`drift` of ``model``'s NTK on ``x`` between two parameter sets (``params=`` of
    :func:`ntkcore.ntk` each: a JAX pytree, or a ``name -> array`` map for torch/Keras);
    ``options`` go to :func:`ntkcore.ntk`."""
    from .api import ntk

    return drift(ntk(model, x, params=params_t, **options), ntk(model, x, params=params_0, **options))
