"""Jacobian contraction (arXiv 2206.08720, section 3.1).

Per-example Jacobians J = df/dθ are built with one vjp per output component, vectorised
(N·O backward passes, N·O·[FP]), then contracted Θ = J1·J2ᵀ parameter by parameter
(N1·N2·O²·P, see :mod:`ntkcore.contraction`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..arrays import output_basis
from ..contraction import contract, contract_by_layer
from ..model_shape import ModelShape
from ..protocol import AutodiffBackend, Params
from ..sizes import CallSizes
from .base import Cost, KernelCall, Method


def jacobians(
    backend: AutodiffBackend, apply: Any, params: Params, x: Any, out_shape: tuple[int, ...], *, coupled: bool
) -> dict[str, Any]:
    """Jacobians ``name -> array of shape (N, *out_shape, *param.shape)``.

    Independent examples: a vmap over examples of O vectorised vjps (N·O·[FP]). Coupled
    examples (``coupled=True``): N·O vjps of the whole batch.
    """
    xp = backend.namespace(x)
    if coupled:
        out, pullback = backend.vjp(lambda p: apply(p, x), params)
        jac = backend.vmap(pullback, (0,))(output_basis(xp, out))
    else:

        def one_example(x_i: Any) -> dict[str, Any]:
            out, pullback = backend.vjp(lambda p: apply(p, x_i[None, ...])[0, ...], params)
            return backend.vmap(pullback, (0,))(output_basis(xp, out))

        jac = backend.vmap(one_example, (0,))(x)
    return {k: xp.reshape(v, (x.shape[0], *out_shape, *params[k].shape)) for k, v in jac.items()}


class JacobianContraction(Method):
    name = "jacobian_contraction"
    label = "JC"
    title = "Jacobian contraction"

    def _both(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> tuple[dict, dict]:
        j1 = jacobians(call.backend, call.apply, params, x1, call.out_shape, coupled=call.coupled)
        if x2 is None:
            return j1, j1
        return j1, jacobians(call.backend, call.apply, params, x2, call.out_shape, coupled=call.coupled)

    def kernel(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> Any:
        j1, j2 = self._both(call, params, x1, x2)
        return contract(call.backend.namespace(x1), j1, j2, call.axes, *call.shapes(x1, x2))

    def per_layer(
        self, call: KernelCall, params: Params, x1: Any, x2: Any, layers: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        """From the same Jacobians as the whole kernel, contracted layer by layer."""
        j1, j2 = self._both(call, params, x1, x2)
        return contract_by_layer(call.backend.namespace(x1), j1, j2, call.axes, *call.shapes(x1, x2), layers)

    def cost(self, shape: ModelShape, sizes: CallSizes, itemsize: int) -> Cost:
        """N·(F + 2·O·F) for the Jacobians (a backward pass is 2F), then 2·N1·N2·C·P."""
        nx, o, kernel = sizes.nx, sizes.outputs, sizes.entries
        p, f, a = shape.params, shape.forward_flops, shape.activations
        passes = nx * (f + 2.0 * o * f)
        peak = nx * o * p + max(sizes.n1, sizes.n2) * o * a + kernel
        return Cost(passes, 2.0 * sizes.pairs * p, peak, nx * o * (p + a) + kernel)


METHOD = JacobianContraction()
