"""NTK-vector products (arXiv 2206.08720, section 3.2).

Column (j, o) of the kernel is Θ·e_(j,o) = J1·(J2ᵀ·e_(j,o)): one vjp on example j of x2 and
one jvp on the batch x1, vectorised over o and over j in chunks of x2 (so that the N2·O
parameter-sized tangents never sit in memory at once). No Jacobian is contracted, so the cost is
N1·N2·O·[FP] with no N²·O²·P term. Trace and diagonal output axes are reduced from the block
afterwards; ``diagonal_axes=(0,)`` pairs x1[i] only with x2[i] (N·O·[FP]).
"""

from __future__ import annotations

import math
from typing import Any

from ..axes import KernelAxes, reduce_pairs
from ..protocol import AutodiffBackend, Params
from ._common import itemsize, output_basis

# The N2·O parameter-sized tangents of the vectorised products stream through memory at every
# layer; vectorising over all of x2 at once is memory-bound well before it fills the cores.
# Chunks of x2 whose tangents take about this many bytes run one after another instead.
CHUNK_BYTES = 64 * 2**20


def chunk_examples(itemsize: int, n_params: int, n: int, outputs: int) -> int | None:
    """Examples of x2 per vectorised step (None: all ``n`` of them), from sizes alone."""
    size = max(1, CHUNK_BYTES // max(outputs * itemsize * n_params, 1))
    return None if size >= n else int(size)


def chunk_size(backend: AutodiffBackend, params: Params, n: int, outputs: int) -> int | None:
    """:func:`chunk_examples` for these parameters."""
    like = next(iter(params.values()))
    n_params = sum(math.prod(p.shape) for p in params.values())
    return chunk_examples(itemsize(backend.dtype_name(like)), n_params, n, outputs)


def kernel(
    backend: AutodiffBackend,
    apply: Any,
    params: Params,
    x1: Any,
    x2: Any,
    axes: KernelAxes,
    out_shape: tuple[int, ...],
    *,
    coupled: bool,
) -> Any:
    """The NTK of ``apply`` at ``params`` between ``x1`` and ``x2``, reduced as ``axes`` says."""
    xp = backend.namespace(x1)
    out_axes = list(range(1, axes.ndim))

    def columns(x_rows: Any, x_col: Any, squeeze: bool) -> Any:
        """Θ(x_rows, x_col) for every output component of x_col: (O, N_rows, *out)."""
        f_col = (lambda p: apply(p, x_col[None, ...])[0, ...]) if squeeze else (lambda p: apply(p, x_col))
        out, pullback = backend.vjp(f_col, params)
        tangents = backend.vmap(pullback, (0,))(output_basis(xp, out))
        push = lambda t: backend.jvp(lambda p: apply(p, x_rows), params, t)[1]  # noqa: E731
        return backend.vmap(push, (0,))(tangents)

    n1, n2 = x1.shape[0], x2.shape[0]
    if coupled:
        block = columns(x1, x2, squeeze=False)  # (N2 * O, N1, *out)
        block = xp.reshape(block, (n2, *out_shape, n1, *out_shape))
        labels = [(2, 0), *[(2, a) for a in out_axes], (1, 0), *[(1, a) for a in out_axes]]
    elif 0 in axes.diagonal:
        block = backend.vmap(lambda a, b: columns(a[None, ...], b, squeeze=True), (0, 0))(x1, x2)
        block = xp.reshape(block, (n1, *out_shape, *out_shape))  # (N, O, 1, *out)
        labels = [("d", 0), *[(2, a) for a in out_axes], *[(1, a) for a in out_axes]]
    else:
        chunk = chunk_size(backend, params, n2, math.prod(out_shape))
        block = backend.vmap(lambda b: columns(x1, b, squeeze=True), (0,), chunk_size=chunk)(x2)  # (N2, O, N1, *out)
        block = xp.reshape(block, (n2, *out_shape, n1, *out_shape))
        labels = [(2, 0), *[(2, a) for a in out_axes], (1, 0), *[(1, a) for a in out_axes]]
    return reduce_pairs(xp, block, labels, axes)
