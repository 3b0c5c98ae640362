"""Eigen-spectrum of an NTK: λ_min, λ_max, condition number, effective rank, trace.

λ_min of the NTK Gram drives the convergence and width guarantees of the NTK analyses
(arXiv 2210.04807); λ_max bounds the stable learning rate. A formed kernel is decomposed by its
framework's own ``eigh``; a matrix-free :class:`~ntkcore.operators.NTKOperator` by Lanczos
(scipy's ARPACK ``eigsh``), so both ends of the spectrum of a kernel too large to form are
available.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from ._xp import namespace_of

logger = logging.getLogger("ntkcore")
PROGRESS_EVERY_S = 30.0  # a log line this often while Lanczos runs


class ConvergenceError(RuntimeError):
    """Lanczos did not converge within its iterations."""


# A kernel is refused as not symmetric when max|K − Kᵀ| exceeds this fraction of max|K|: far
# above float32 rounding of J1·J2ᵀ (≈1e-6), far below the asymmetry of a kernel between two
# different batches.
SYMMETRY_RTOL = 1e-3


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues (ascending, the caller's framework array) and the numbers read from them.

    ``effective_rank`` is exp of the entropy of the normalised spectrum λ_i / Σλ (Roy &
    Vetterli 2007): n for a flat spectrum, 1 for a rank-one kernel. From a partial spectrum
    (``k=``) only ``lambda_min``/``lambda_max`` of the computed end(s) are exact, and the
    statistics that need every eigenvalue are ``None``.
    """

    eigenvalues: Any
    lambda_min: float | None
    lambda_max: float | None
    trace: float | None
    size: int

    @property
    def condition_number(self) -> float | None:
        """λ_max / λ_min (inf when λ_min ≤ 0: a singular kernel)."""
        if self.lambda_min is None or self.lambda_max is None:
            return None
        return self.lambda_max / self.lambda_min if self.lambda_min > 0 else math.inf

    @property
    def effective_rank(self) -> float | None:
        if self.trace is None:
            return None
        values = [max(float(v), 0.0) for v in to_host(self.eigenvalues).reshape(-1).tolist()]
        total = sum(values)
        if total <= 0:
            return 0.0
        return math.exp(-sum(p * math.log(p) for p in (v / total for v in values) if p > 0))

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "—" if v is None else f"{v:.4g}"

        return (
            f"spectrum of a {self.size}×{self.size} kernel: λ_min {fmt(self.lambda_min)}, "
            f"λ_max {fmt(self.lambda_max)}, condition {fmt(self.condition_number)}, "
            f"effective rank {fmt(self.effective_rank)}, trace {fmt(self.trace)}"
        )


def to_host(a: Any) -> Any:
    """A numpy copy of an array of any framework: numpy reads it directly, else its adapter
    copies it to the host (a CUDA tensor, say)."""
    import numpy as np

    try:
        return np.asarray(a)
    except Exception:  # a framework array numpy cannot read directly
        from .registry import backend_for_arrays

        backend = backend_for_arrays(a)
        if backend is None:
            raise TypeError(f"cannot copy an array of type {type(a).__name__} to the host") from None
        return backend.to_numpy(a)


def square_matrix(kernel: Any, name: str = "kernel") -> tuple[Any, Any]:
    """``(xp, K)``: the kernel as a square matrix (N·O, N·O), from (N, N) or (N, N, *out, *out)."""
    from .api import flatten

    try:
        xp = namespace_of(kernel)
    except TypeError:
        raise TypeError(f"{name} must be an array, got {type(kernel).__name__}") from None
    shape = tuple(kernel.shape)
    if len(shape) < 2 or len(shape) % 2:
        raise ValueError(
            f"{name} of shape {shape} is not a kernel (N, N) or (N, N, *out, *out); compute it without diagonal_axes"
        )
    matrix = kernel if len(shape) == 2 else flatten(kernel)
    rows, cols = matrix.shape
    if rows != cols:
        raise ValueError(f"{name} of shape {shape} is not square as a matrix ({rows}×{cols}): expected Θ(x, x)")
    return xp, matrix


def symmetric_matrix(kernel: Any, name: str = "kernel") -> tuple[Any, Any]:
    """:func:`square_matrix`, checked symmetric (to :data:`SYMMETRY_RTOL`) and symmetrised."""
    xp, matrix = square_matrix(kernel, name)
    transposed = xp.permute_dims(matrix, (1, 0))
    scale = float(xp.max(xp.abs(matrix)))
    asymmetry = float(xp.max(xp.abs(matrix - transposed)))
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} is not symmetric (max |K − Kᵀ| = {asymmetry:.3g}, max |K| = {scale:.3g}): expected the "
            "kernel of one batch with itself, Θ(x, x)"
        )
    return xp, (matrix + transposed) / 2


def spectrum(
    kernel: Any,
    k: int | None = None,
    *,
    which: str = "both",
    tol: float = 0.0,
    maxiter: int | None = None,
    method: str = "auto",
) -> Spectrum:
    """The eigenvalues of a symmetric kernel and its λ_min, λ_max, condition number, effective
    rank and trace.

    Args:
        kernel: Θ(x, x) of shape (N, N) or (N, N, *out, *out) (flattened to (N·O, N·O)), or an
            :class:`~ntkcore.operators.NTKOperator` (then ``k`` is required: Lanczos).
        k: ``None`` for every eigenvalue; else the ``k`` largest (``which="largest"``), smallest
            (``"smallest"``) or both (``"both"``, 2k values).
        which: the end(s) of the spectrum ``k`` picks.
        tol: Lanczos' relative accuracy (0: machine precision), for operators only.
        maxiter: Lanczos' restarts (default ARPACK's, 10·N); past them :class:`ConvergenceError`.
        method: for an operator, ``"auto"`` (default) forms the kernel and uses ``eigh`` when it
            fits the memory budget (exact, and milliseconds where Lanczos may need minutes on an
            ill-conditioned kernel), else Lanczos; ``"eigh"`` or ``"lanczos"`` force one.
    """
    from .operators import NTKOperator

    if which not in ("largest", "smallest", "both"):
        raise ValueError(f'which must be "largest", "smallest" or "both", got {which!r}')
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive number of eigenvalues or None, got {k!r}")
    if method not in ("auto", "eigh", "lanczos"):
        raise ValueError(f'method must be "auto", "eigh" or "lanczos", got {method!r}')
    if isinstance(kernel, NTKOperator):
        if method == "eigh" or (method == "auto" and k is not None and kernel.fits()):
            return spectrum(kernel.kernel(), k, which=which)
        if k is None:
            raise ValueError(
                "k is required for an NTKOperator: the number of eigenvalues Lanczos computes "
                f'(or method="eigh" to form the kernel, {kernel.kernel_bytes() / 1e9:.3g} GB, for all of them)'
            )
        return _lanczos(kernel, k, which, tol, maxiter)
    xp, matrix = symmetric_matrix(kernel)
    n = matrix.shape[0]
    if k is not None and k > n:
        raise ValueError(f"k={k} exceeds the kernel's size {n}")
    values = xp.linalg.eigvalsh(matrix)  # ascending
    lo, hi = float(values[0]), float(values[n - 1])
    if k is None:
        return Spectrum(values, lo, hi, float(xp.sum(values)), n)
    if which == "largest":
        return Spectrum(values[n - k :], None, hi, None, n)
    if which == "smallest":
        return Spectrum(values[:k], lo, None, None, n)
    picked = values if 2 * k >= n else xp.concat([values[:k], values[n - k :]], axis=0)
    return Spectrum(picked, lo, hi, None, n)


def _lanczos(op: Any, k: int, which: str, tol: float, maxiter: int | None) -> Spectrum:
    """ARPACK's implicitly restarted Lanczos on the operator's matvec (host numpy vectors)."""
    import numpy as np

    try:
        from scipy.sparse.linalg import ArpackNoConvergence, eigsh
    except ImportError:  # pragma: no cover - scipy is in the analysis extra
        raise ImportError("spectrum() of an NTKOperator needs scipy: pip install 'ntkcore[analysis]'") from None
    n = op.shape[0]
    if k >= n:
        raise ValueError(f"k={k} must be below the operator's size {n} for Lanczos; form the kernel instead")
    linear = _logged(op.aslinearoperator(), k)
    ends = {"largest": ("LA",), "smallest": ("SA",), "both": ("LA", "SA")}[which]
    found = {}
    for end in ends:
        try:
            found[end] = np.sort(eigsh(linear, k=k, which=end, tol=tol, maxiter=maxiter, v0=np.ones(n))[0])
        except ArpackNoConvergence as error:
            raise ConvergenceError(_no_convergence(op, error, k, end, maxiter)) from None
    values = np.concatenate([found[e] for e in ("SA", "LA") if e in found])
    lo = float(found["SA"][0]) if "SA" in found else None
    hi = float(found["LA"][-1]) if "LA" in found else None
    return Spectrum(op.from_numpy(values), lo, hi, None, n)


def _logged(linear: Any, k: int) -> Any:
    """The operator, logging the number of products taken every ``PROGRESS_EVERY_S`` seconds."""
    from scipy.sparse.linalg import LinearOperator

    state = {"count": 0, "start": time.perf_counter(), "last": time.perf_counter()}

    def mv(v: Any) -> Any:
        state["count"] += 1
        now = time.perf_counter()
        if now - state["last"] >= PROGRESS_EVERY_S:
            state["last"] = now
            logger.info("spectrum: Lanczos for k=%d, %d products in %.0f s", k, state["count"], now - state["start"])
        return linear.matvec(v)

    return LinearOperator(linear.shape, matvec=mv, rmatvec=mv, dtype=linear.dtype)


def _no_convergence(op: Any, error: Any, k: int, end: str, maxiter: int | None) -> str:
    """What did not converge, how far it got, and what to try."""
    import numpy as np

    values, vectors = error.eigenvalues, error.eigenvectors
    residual = ""
    if len(values):
        products = np.stack([op.aslinearoperator().matvec(vectors[:, i]) for i in range(len(values))], axis=1)
        errors = np.linalg.norm(products - vectors * values, axis=0) / np.maximum(np.abs(values), 1e-300)
        residual = f"; the largest relative residual of those is {float(errors.max()):.3g}"
    side = "largest" if end == "LA" else "smallest"
    return (
        f"spectrum: Lanczos found {len(values)} of the k={k} {side} eigenvalues within maxiter={maxiter or 'default'}"
        f'{residual}. Try a larger maxiter=, a looser tol=, a smaller k, or method="eigh" (the kernel takes '
        f"{op.kernel_bytes() / 1e9:.3g} GB)"
    )
