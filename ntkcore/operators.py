"""The NTK as a matrix-free linear operator: Θ·v = J·(Jᵀ·v), one vjp and one jvp per product.

Forming Θ(x, x) costs N²·O² memory; a product with it costs one backward and one forward pass
over the batch (≈ 2N forward passes) and memory of one set of parameters. So λ_max, λ_min and
solves are available (Lanczos, conjugate gradients) for kernels far too large to form. The
vjp and jvp run over the batch as a whole, which is exact for any model, examples interacting
or not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .kernel_fn import KernelFn


class NTKOperator:
    """Θ(x, x) as a linear operator of shape (N·O, N·O) (O: the kept output size).

    ``matvec(v)`` takes a vector of N·O entries (or an array (N, *kept out)) of the model's
    framework or numpy, and returns Θ·v in the same form: the framework's array for a framework
    input, numpy for numpy. ``matmat`` and ``@`` take several columns. ``aslinearoperator()``
    gives a ``scipy.sparse.linalg.LinearOperator`` for scipy's Lanczos, LOBPCG or CG.
    """

    def __init__(self, fn: KernelFn, x: Any) -> None:
        x, _, out_shape, axes = fn.resolve(x, None)
        if axes.diagonal:
            raise ValueError("ntk_operator: diagonal_axes are not supported; the operator is Θ(x, x) as a matrix")
        self._x, self._fn, self._axes = x, fn, axes
        self._backend, self._prepared = fn.backend, fn.prepared
        self._out_shape = out_shape
        self._kept = [a - 1 for a in axes.kept if a != 0]  # axes of the per-example output
        self._traced = [a - 1 for a in axes.trace if a != 0]
        n = x.shape[0]
        kept_size = math.prod(out_shape[a] for a in self._kept)
        self._vector_shape = (n, *(out_shape[a] for a in self._kept))
        self.shape = (n * kept_size, n * kept_size)
        self._like = next(iter(self._prepared.params.values()))
        self.dtype = self._backend.dtype_name(self._like)
        self._product = self._backend.jit(self._build())

    def _build(self) -> Any:
        backend, apply = self._backend, self._prepared.apply
        out_shape, kept, traced = self._out_shape, self._kept, self._traced
        n = self._x.shape[0]
        traced_size = math.prod(out_shape[a] for a in traced)
        # kept output axes first, traced ones last: a cotangent is v on the kept axes times a
        # one-hot on the traced ones, and the traced products are summed
        order = (0, *(a + 1 for a in kept), *(a + 1 for a in traced))
        inverse = tuple(order.index(i) for i in range(len(order)))
        moved = (n, *(out_shape[a] for a in kept), *(out_shape[a] for a in traced))

        def product(params: Any, x: Any, v: Any) -> Any:
            xp = backend.namespace(v)
            _, pullback = backend.vjp(lambda p: apply(p, x), params)
            basis = xp.reshape(xp.eye(traced_size, dtype=v.dtype), (traced_size, *moved[len(moved) - len(traced) :]))

            def one(e: Any) -> Any:
                cot = xp.reshape(v, (*v.shape, *([1] * len(traced)))) * e
                tangent = pullback(xp.permute_dims(xp.reshape(cot, moved), inverse))
                pushed = backend.jvp(lambda p: apply(p, x), params, tangent)[1]
                moved_out = xp.reshape(xp.permute_dims(pushed, order), (*v.shape, traced_size))
                return xp.matmul(moved_out, xp.reshape(e, (traced_size, 1)))

            columns = backend.vmap(one, (0,))(basis)  # (T, *v.shape, 1)
            return xp.sum(xp.reshape(columns, (traced_size, *v.shape)), axis=0)

        return product

    # -- products ---------------------------------------------------------------------------
    def matvec(self, v: Any) -> Any:
        """Θ·v for a vector of N·O entries (or an array (N, *kept out))."""
        native, is_numpy = self._native(v, "v")
        size = math.prod(self._vector_shape)
        if math.prod(native.shape) != size:
            raise ValueError(f"v has {math.prod(native.shape)} entries, expected {size} (shape {self._vector_shape})")
        xp = self._backend.namespace(native)
        result = self._product(self._prepared.params, self._x, xp.reshape(native, self._vector_shape))
        result = xp.reshape(result, tuple(native.shape))
        return self._backend.to_numpy(result) if is_numpy else result

    def matmat(self, v: Any) -> Any:
        """Θ·V for a matrix V of shape (N·O, k), column by column."""
        if len(v.shape) != 2 or v.shape[0] != self.shape[0]:
            raise ValueError(f"V must have shape ({self.shape[0]}, k), got {tuple(v.shape)}")
        native, is_numpy = self._native(v, "V")
        xp = self._backend.namespace(native)
        columns = [self.matvec(native[:, j]) for j in range(native.shape[1])]
        result = xp.stack(columns, axis=1) if columns else native
        return self._backend.to_numpy(result) if is_numpy else result

    def __matmul__(self, v: Any) -> Any:
        return self.matvec(v) if len(v.shape) == 1 else self.matmat(v)

    def aslinearoperator(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy vectors in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(v: Any) -> Any:
            return np.asarray(self.matvec(np.asarray(v).reshape(-1)), dtype=np.float64)

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)

    def kernel_bytes(self) -> int:
        """Bytes of the kernel as a matrix (N·O)², in the operator's dtype."""
        return self.shape[0] ** 2 * self._fn.itemsize

    def fits(self) -> bool:
        """Whether the kernel, with room for ``eigh``'s work (3 copies), fits the memory budget
        (1 GB where the free memory is unknown)."""
        budget = self._fn.budget()[0]
        return 3 * self.kernel_bytes() <= (1e9 if budget is None else budget)

    def kernel(self) -> Any:
        """Θ(x, x) formed (the cheapest implementation ``auto`` finds), as ``ntkcore.ntk`` gives it."""
        return self._fn.untiled(self._x, None, self._out_shape, self._axes)

    def from_numpy(self, a: Any) -> Any:
        """A numpy array as this operator's framework array (its dtype and device)."""
        return self._backend.asarray(a, like=self._like)

    def _native(self, v: Any, name: str) -> tuple[Any, bool]:
        import numpy as np

        is_numpy = isinstance(v, np.ndarray)
        try:
            native = self._backend.asarray(np.asarray(v, dtype=np.float64) if is_numpy else v, like=self._like)
        except TypeError as error:
            raise TypeError(f"{name}: {error}") from None
        return native, is_numpy

    def __repr__(self) -> str:
        return f"NTKOperator(shape={self.shape}, dtype={self.dtype}, backend={self._backend.name})"


def ntk_operator(
    model: Any,
    x: Any,
    *,
    params: Any = None,
    trace_axes: int | Sequence[int] = (),
    backend: str | None = None,
    batch_independent: bool | None = None,
    output: Any = None,
) -> NTKOperator:
    """Θ(x, x) of ``model`` as a matrix-free :class:`NTKOperator` (see :func:`ntkcore.ntk` for
    the arguments). ``ntkcore.spectrum(op, k=...)`` gives its extreme eigenvalues by Lanczos.
    With ``trace_axes``, each product takes one vjp/jvp pair per traced output component."""
    fn = KernelFn(
        model,
        params=params,
        trace_axes=trace_axes,
        diagonal_axes=(),
        backend=backend,
        batch_independent=batch_independent,
        kind="ntk",
        output=output,
    )
    return NTKOperator(fn, x)
