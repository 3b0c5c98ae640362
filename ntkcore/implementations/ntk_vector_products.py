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

from ..arrays import itemsize, output_basis
from ..axes import reduce_pairs
from ..model_shape import ModelShape
from ..protocol import AutodiffBackend, Params
from ..sizes import CallSizes
from .base import Cost, KernelCall, Method

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


def _columns(call: KernelCall, params: Params, x_rows: Any, x_col: Any, squeeze: bool) -> Any:
    """Θ(x_rows, x_col) for every output component of x_col: (O, N_rows, *out)."""
    backend, apply = call.backend, call.apply
    f_col = (lambda p: apply(p, x_col[None, ...])[0, ...]) if squeeze else (lambda p: apply(p, x_col))
    out, pullback = backend.vjp(f_col, params)
    tangents = backend.vmap(pullback, (0,))(output_basis(backend.namespace(x_rows), out))
    push = lambda t: backend.jvp(lambda p: apply(p, x_rows), params, t)[1]  # noqa: E731
    return backend.vmap(push, (0,))(tangents)


class NTKVectorProducts(Method):
    name = "ntk_vector_products"
    label = "NVP"
    title = "NTK-vector products"

    def kernel(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> Any:
        x2 = x1 if x2 is None else x2
        backend, axes, out_shape = call.backend, call.axes, call.out_shape
        xp = backend.namespace(x1)
        out_axes = list(range(1, axes.ndim))
        n1, n2 = x1.shape[0], x2.shape[0]
        by_columns = [(2, 0), *[(2, a) for a in out_axes], (1, 0), *[(1, a) for a in out_axes]]
        if call.coupled:
            block = _columns(call, params, x1, x2, squeeze=False)  # (N2 * O, N1, *out)
            block, labels = xp.reshape(block, (n2, *out_shape, n1, *out_shape)), by_columns
        elif 0 in axes.diagonal:
            block = backend.vmap(lambda a, b: _columns(call, params, a[None, ...], b, True), (0, 0))(x1, x2)
            block = xp.reshape(block, (n1, *out_shape, *out_shape))  # (N, O, 1, *out)
            labels = [("d", 0), *[(2, a) for a in out_axes], *[(1, a) for a in out_axes]]
        else:
            chunk = chunk_size(backend, params, n2, math.prod(out_shape))
            columns = backend.vmap(lambda b: _columns(call, params, x1, b, True), (0,), chunk_size=chunk)
            block, labels = xp.reshape(columns(x2), (n2, *out_shape, n1, *out_shape)), by_columns
        return reduce_pairs(xp, block, labels, axes)

    def cost(self, shape: ModelShape, sizes: CallSizes, itemsize: int) -> Cost:
        """N2·(F + 2·O·F) for the vjps, then N1·N2·O forward-mode passes of 3F (N·O with
        ``diagonal_axes=(0,)``)."""
        n1, n2, o, kernel = sizes.n1, sizes.n2, sizes.outputs, sizes.entries
        p, f, a = shape.params, shape.forward_flops, shape.activations
        if sizes.diagonal_batch:
            passes = n1 * (f + 2.0 * o * f) + n1 * o * 3.0 * f
            peak = traffic = n1 * o * (p + a) + kernel
        else:
            chunk = chunk_examples(itemsize, p, n2, o) or n2
            passes = n2 * (f + 2.0 * o * f) + n1 * n2 * o * 3.0 * f
            peak = chunk * o * (p + n1 * a) + n2 * o * n1 * o + kernel
            traffic = n2 * o * (p + n1 * a) + n2 * o * n1 * o + kernel
        return Cost(passes, 0.0, peak, traffic)


METHOD = NTKVectorProducts()
