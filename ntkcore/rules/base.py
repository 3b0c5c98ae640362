"""What a structure rule is: one layer kind's kernel, per-example gradients, costs and wording.

A rule receives, for both batches, a layer's structured input (normalised by
:meth:`Rule.structured_input`) and its output cotangents ``g`` of shape (N, *out, S, F) — one
per output component of f, per token position s, per feature — and returns the layer's
contribution to the kernel in the order of ``axes.final_labels()``, without forming ∂y/∂θ.
The structured engine (:mod:`ntkcore.implementations.structured`), the cost model and
``explain`` call only this interface, so a new layer kind is one module in this package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from ..axes import KernelAxes
from ..contraction import contract
from ..sizes import CallSizes

# multiply-adds per element an order writes to memory and reads back (2-core CPUs): batched
# matmuls over short axes are memory-bound, so the rules' orders are scored with it
MEMORY_WEIGHT = 16


def per_example(xp: Any, jac1: dict, jac2: dict, axes: KernelAxes) -> Any:
    """Contract per-example gradients ``name -> (N, *out, P)``."""
    first = next(iter(jac1.values()))
    second = jac2[next(iter(jac1))]
    return contract(xp, jac1, jac2, axes, tuple(first.shape[: axes.ndim]), tuple(second.shape[: axes.ndim]))


def per_example_cost(tokens: int, size: int, sizes: CallSizes) -> tuple[float, float]:
    """(FLOPs, elements written) of forming per-example gradients Σ_s over ``tokens`` positions of
    ``size`` parameters, then contracting them."""
    nx, o = sizes.nx, sizes.outputs
    return 2.0 * nx * o * tokens * size + 2.0 * sizes.pairs * size, float(nx * o * size)


class Rule:
    """One layer kind. Subclasses set ``kind`` and implement :meth:`kernel`; the rest has defaults.

    ``native_gradients``: :meth:`gradients` returns the parameters' gradients in their own
    layout (``LayerUse.native_layout``), so a parameter shared with a layer of another kind is
    summed from them. ``matmul_role``: the role whose forward pass is a matmul over the input
    (its FLOPs count towards a forward pass; its size over the output features is the fan-in).
    """

    kind: ClassVar[str]
    native_gradients: ClassVar[bool] = False
    matmul_role: ClassVar[str | None] = None

    def structured_input(self, xp: Any, inputs: Any, n: int, tokens: int, order: list[int] | None) -> Any:
        """The adapter's structured input as (N, S, in). ``order`` is the permutation that moved
        the layer output's feature axis last (``None``: it was last already)."""
        return xp.reshape(inputs, (n, tokens, inputs.shape[-1]))

    def kernel(self, xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
        """The layer's kernel contribution for the parameter ``roles`` asked for."""
        raise NotImplementedError

    def gradients(self, xp: Any, x: Any, g: Any, roles: set[str], shapes: Mapping[str, tuple]) -> dict[str, Any]:
        """Per-example gradients ``role -> (N, *out, P)`` in the parameters' layouts."""
        raise NotImplementedError(f"the {self.kind} rule has no per-example gradients in the parameters' layout")

    def sketch_factors(self, shapes: Mapping[str, tuple], x: Any, g: Any) -> dict[str, tuple[int, ...]]:
        """role -> the lengths of the sign vectors one column of a sketch draws for it: one
        vector of the parameter's size by default; rules whose gradients are outer products draw
        one per factor (a Kronecker-structured column, :meth:`project`)."""
        return {role: (math.prod(shape),) for role, shape in shapes.items()}

    def sketch_pays(self, layer: Any) -> bool:
        """Whether the Kronecker-structured sketch should take a layer the framework
        differentiates (:class:`~ntkcore.model_shape.LayerShape`) by this rule, its input formed
        on request, rather than project the framework's per-example gradients."""
        return False

    def project(self, xp: Any, x: Any, g: Any, shapes: Mapping[str, tuple], signs: Mapping[str, list[Any]]) -> Any:
        """Σ_roles J_role·r for the sketch's columns: ``signs[role]`` holds one (length, c) array
        per factor of :meth:`sketch_factors`; returns (N, *out, c). By default the per-example
        gradients times the signs."""
        grads = self.gradients(xp, x, g, set(shapes), shapes)
        return sum(xp.matmul(grads[role], signs[role][0]) for role in shapes)

    def forward_flops(self, tokens: int, features: int, sizes: Mapping[str, int]) -> float:
        """FLOPs of one call on one example (``sizes``: role -> parameter size)."""
        return 0.0

    def fan_in(self, sizes: Mapping[str, int], features: int) -> int:
        """Inputs per output feature (0 for kinds without a matmul)."""
        return sizes.get(self.matmul_role, 0) // max(features, 1) if self.matmul_role else 0

    def cost(self, layer: Any, sizes: CallSizes) -> tuple[float, float]:
        """(contraction FLOPs, elements of the intermediate it writes) for a captured layer
        (:class:`ntkcore.model_shape.LayerShape`); by default per-example gradients contracted."""
        return per_example_cost(layer.tokens, sum(layer.sizes.values()), sizes)

    def beats_framework(self, layer: Any, sizes: CallSizes) -> bool:
        """Whether the rule, given its structured input on request, is cheaper than per-example
        gradients from the framework's backward pass (``Capture.deferred_inputs``)."""
        return False

    def describe(self, layer: Any, sizes: CallSizes) -> str:
        """One line for ``explain``: what the rule does with this layer at these sizes."""
        return f"{self.kind} rule"

    def __repr__(self) -> str:
        return f"<rule {self.kind!r}>"


def token_count(shape: tuple[int, ...], feature_axis: int) -> tuple[int, int]:
    """(tokens, features) of a layer output of ``shape`` (a batch of one) with that feature axis."""
    features = shape[feature_axis]
    return math.prod(shape) // max(features, 1), features
