"""Jacobian contraction (arXiv 2206.08720, section 3.1).

Per-example Jacobians J = df/dθ are built with one vjp per output component, vectorised
(N·O backward passes, N·O·[FP]), then contracted Θ = J1·J2ᵀ parameter by parameter
(N1·N2·O²·P, see :mod:`ntkcore.contraction`).

When every output axis is traced (a logit kernel summed over the vocabulary), Θ = Σ_o J1[o]·J2[o]ᵀ
is accumulated over chunks of output components, so that the Jacobians held at once are
N·chunk·P elements (at most :data:`JACOBIAN_ELEMENTS`), not N·O·P: the same passes and FLOPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ..arrays import output_basis
from ..axes import KernelAxes
from ..contraction import contract, contract_by_layer
from ..model_shape import ModelShape
from ..protocol import AutodiffBackend, Params
from ..sizes import CallSizes
from .base import Cost, KernelCall, Method, add_parts

# Jacobian elements held at once per side when the outputs are traced (1 GiB of float32).
JACOBIAN_ELEMENTS = 1 << 28


def output_chunk(axes: KernelAxes, nx: int, outputs: int, params: int) -> int:
    """Output components whose Jacobians are built at once: all of them, unless every output
    axis is traced and N·O·P would exceed :data:`JACOBIAN_ELEMENTS`."""
    if set(axes.trace) != set(range(1, axes.ndim)) or nx * outputs * params <= JACOBIAN_ELEMENTS:
        return outputs
    return max(1, min(outputs, JACOBIAN_ELEMENTS // max(nx * params, 1)))


def jacobians(
    backend: AutodiffBackend,
    apply: Any,
    params: Params,
    x: Any,
    out_shape: tuple[int, ...],
    *,
    coupled: bool,
    components: slice | None = None,
) -> dict[str, Any]:
    """Jacobians ``name -> array of shape (N, *out_shape, *param.shape)``; of the flattened
    output ``components`` only, as (N, chunk, *param.shape), when that slice is given
    (independent examples only).

    Independent examples: a vmap over examples of O vectorised vjps (N·O·[FP]). Coupled
    examples (``coupled=True``): N·O vjps of the whole batch.
    """
    xp = backend.namespace(x)

    def basis(out: Any) -> Any:
        full = output_basis(xp, out)
        return full if components is None else full[components]

    if coupled:
        out, pullback = backend.vjp(lambda p: apply(p, x), params)
        jac = backend.vmap(pullback, (0,))(output_basis(xp, out))
    else:

        def one_example(x_i: Any) -> dict[str, Any]:
            out, pullback = backend.vjp(lambda p: apply(p, x_i[None, ...])[0, ...], params)
            return backend.vmap(pullback, (0,))(basis(out))

        jac = backend.vmap(one_example, (0,))(x)
    if components is not None:
        return {k: xp.reshape(v, (x.shape[0], -1, *params[k].shape)) for k, v in jac.items()}
    return {k: xp.reshape(v, (x.shape[0], *out_shape, *params[k].shape)) for k, v in jac.items()}


class JacobianContraction(Method):
    name = "jacobian_contraction"
    label = "JC"
    title = "Jacobian contraction"

    def _both(self, call: KernelCall, params: Params, x1: Any, x2: Any, components: slice | None = None) -> tuple:
        j1 = jacobians(
            call.backend, call.apply, params, x1, call.out_shape, coupled=call.coupled, components=components
        )
        if x2 is None:
            return j1, j1
        j2 = jacobians(
            call.backend, call.apply, params, x2, call.out_shape, coupled=call.coupled, components=components
        )
        return j1, j2

    def _accumulated(self, call: KernelCall, params: Params, x1: Any, x2: Any, contract_fn: Callable) -> Any:
        """``contract_fn(j1, j2, axes, shape1, shape2)`` over all outputs, or summed over chunks of
        output components where :func:`output_chunk` asks for them."""
        outputs = math.prod(call.out_shape)
        size = sum(math.prod(v.shape) for v in params.values())
        nx = x1.shape[0] + (0 if x2 is None else x2.shape[0])
        chunk = outputs if call.coupled else output_chunk(call.axes, nx, outputs, size)
        if chunk >= outputs:
            return contract_fn(*self._both(call, params, x1, x2), call.axes, *call.shapes(x1, x2))
        axes = KernelAxes(2, (1,), (0,) if 0 in call.axes.diagonal else ())
        shape1, shape2 = call.shapes(x1, x2)
        total = None
        for start in range(0, outputs, chunk):
            stop = min(start + chunk, outputs)
            j1, j2 = self._both(call, params, x1, x2, slice(start, stop))
            part = contract_fn(j1, j2, axes, (shape1[0], stop - start), (shape2[0], stop - start))
            total = part if total is None else add_parts(total, part)
        return total

    def kernel(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> Any:
        xp = call.backend.namespace(x1)
        return self._accumulated(call, params, x1, x2, lambda j1, j2, *rest: contract(xp, j1, j2, *rest))

    def per_layer(
        self, call: KernelCall, params: Params, x1: Any, x2: Any, layers: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        """From the same Jacobians as the whole kernel, contracted layer by layer."""
        xp = call.backend.namespace(x1)
        return self._accumulated(
            call, params, x1, x2, lambda j1, j2, *rest: contract_by_layer(xp, j1, j2, *rest, layers)
        )

    def cost(self, shape: ModelShape, sizes: CallSizes, itemsize: int) -> Cost:
        """N·(F + 2·O·F) for the Jacobians (a backward pass is 2F), then 2·N1·N2·C·P."""
        nx, o, kernel = sizes.nx, sizes.outputs, sizes.entries
        p, f, a = shape.params, shape.forward_flops, shape.activations
        passes = nx * (f + 2.0 * o * f)
        chunk = output_chunk(sizes.axes, nx, o, p)  # outputs whose Jacobians are held at once
        peak = nx * chunk * p + max(sizes.n1, sizes.n2) * chunk * a + kernel
        return Cost(passes, 2.0 * sizes.pairs * p, peak, nx * o * (p + a) + kernel)


METHOD = JacobianContraction()
