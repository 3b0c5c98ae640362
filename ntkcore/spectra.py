"""Eigen-spectrum of an NTK: λ_min, λ_max, condition number, effective rank, trace.

λ_min of the NTK Gram drives the convergence and width guarantees of the NTK analyses
(arXiv 2210.04807); λ_max bounds the stable learning rate. A formed kernel is decomposed by its
framework's own ``eigh``; a matrix-free :class:`~ntkcore.operators.NTKOperator` by Lanczos
(scipy's ARPACK ``eigsh``), so both ends of the spectrum of a kernel too large to form are
available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._xp import namespace_of

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


def spectrum(kernel: Any, k: int | None = None, *, which: str = "both", tol: float = 0.0) -> Spectrum:
    """The eigenvalues of a symmetric kernel and its λ_min, λ_max, condition number, effective
    rank and trace.

    Args:
        kernel: Θ(x, x) of shape (N, N) or (N, N, *out, *out) (flattened to (N·O, N·O)), or an
            :class:`~ntkcore.operators.NTKOperator` (then ``k`` is required: Lanczos).
        k: ``None`` for every eigenvalue; else the ``k`` largest (``which="largest"``), smallest
            (``"smallest"``) or both (``"both"``, 2k values).
        which: the end(s) of the spectrum ``k`` picks.
        tol: Lanczos' relative accuracy (0: machine precision), for operators only.
    """
    from .operators import NTKOperator

    if which not in ("largest", "smallest", "both"):
        raise ValueError(f'which must be "largest", "smallest" or "both", got {which!r}')
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive number of eigenvalues or None, got {k!r}")
    if isinstance(kernel, NTKOperator):
        if k is None:
            raise ValueError("k is required for an NTKOperator: the number of eigenvalues Lanczos computes")
        return _lanczos(kernel, k, which, tol)
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


def _lanczos(op: Any, k: int, which: str, tol: float) -> Spectrum:
    """ARPACK's implicitly restarted Lanczos on the operator's matvec (host numpy vectors)."""
    import numpy as np

    try:
        from scipy.sparse.linalg import eigsh
    except ImportError:  # pragma: no cover - scipy is in the analysis extra
        raise ImportError("spectrum() of an NTKOperator needs scipy: pip install 'ntkcore[analysis]'") from None
    n = op.shape[0]
    if k >= n:
        raise ValueError(f"k={k} must be below the operator's size {n} for Lanczos; form the kernel instead")
    linear = op.aslinearoperator()
    ends = {"largest": ("LA",), "smallest": ("SA",), "both": ("LA", "SA")}[which]
    found = {
        end: np.sort(eigsh(linear, k=k, which=end, tol=tol, return_eigenvectors=False, v0=np.ones(n))) for end in ends
    }
    values = np.concatenate([found[e] for e in ("SA", "LA") if e in found])
    lo = float(found["SA"][0]) if "SA" in found else None
    hi = float(found["LA"][-1]) if "LA" in found else None
    return Spectrum(op.from_numpy(values), lo, hi, None, n)
