"""Dense layers y_s = x_s·W (+ b): Θ = Σ_{s,t} (x1_s·x2_t + 1[bias]) (g1_s·g2_t), or, when token
axes make the pairwise form dearer, the per-example gradients Σ_s g_sᵀx_s contracted.

Adapters map to it every matmul of an input with a weight (torch ``nn.Linear``, the
in-projection of self-attention, Keras ``Dense``/``EinsumDense``, JAX ``dot_general``) and a
bias added alone (a dense layer on a constant ±1 input). A weight used in several calls (a
layer applied twice) arrives with the calls' token axes concatenated, which makes the cross
terms exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..axes import KernelAxes
from ..sizes import CallSizes, output_pairs, pair_entries
from .base import MEMORY_WEIGHT, Rule, per_example
from .pairwise import ones, pair_weights, pairwise


def orders(
    n1: int, n2: int, s: int, n_in: int, f: int, out_shape: tuple[int, ...], axes: KernelAxes
) -> dict[str, tuple[float, float, float]]:
    """The rule's two contraction orders: ``order -> (score, FLOPs, intermediate elements)``.

    The rule takes the order of lower score, and the cost model predicts with the same
    figures. The score counts multiply-adds plus ``MEMORY_WEIGHT`` for every element of the
    intermediate an order materialises (token products, per-example gradients): batched
    matmuls over a short token axis are memory-bound, so multiply-adds alone pick the slower
    order. FLOPs are 2 × multiply-adds.
    """
    examples = n1 if 0 in axes.diagonal else n1 * n2
    pairs = examples * output_pairs(axes, out_shape)
    entries = examples * pair_entries(axes, out_shape)  # kernel entries per pair of tokens
    pairwise_ = pairs * s * s * f + examples * s * s * n_in
    gradients_ = (n1 + n2) * math.prod(out_shape) * f * n_in
    per_example_ = gradients_ * s + pairs * f * n_in
    return {
        "pairwise": (pairwise_ + MEMORY_WEIGHT * entries * s * s, 2.0 * pairwise_, float(entries * s * s)),
        "per_example": (per_example_ + MEMORY_WEIGHT * gradients_, 2.0 * per_example_, float(gradients_)),
    }


def kernel(
    xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str], order: str | None = None
) -> Any:
    """``x`` (N, S, in), ``g`` (N, *out, S, F); ``roles`` ⊆ {weight, bias}.

    ``order`` forces ``"pairwise"`` or ``"per_example"``; by default the one :func:`orders`
    scores lower is taken.
    """
    costs = orders(x1.shape[0], x2.shape[0], x1.shape[1], x1.shape[2], g1.shape[-1], tuple(g1.shape[1:-2]), axes)
    if order == "pairwise" or (order is None and costs["pairwise"][0] <= costs["per_example"][0]):
        weights = 0
        if "weight" in roles:
            weights = pair_weights(xp, x1, x2, axes, equal=False, dtype=g1.dtype)
        if "bias" in roles:
            weights = weights + 1 if "weight" in roles else ones(xp, x1, x2, axes, g1)
        return pairwise(xp, g1, g2, weights, axes)
    return per_example(xp, gradients(xp, x1, g1, roles), gradients(xp, x2, g2, roles), axes)


def gradients(xp: Any, x: Any, g: Any, roles: set[str], shapes: Any = None) -> dict[str, Any]:
    """Per-example gradients: weight (N, *out, F·in) as Σ_s g_sᵀx_s (W laid out (out, in)),
    bias (N, *out, F)."""
    s, n_in, f = x.shape[1], x.shape[2], g.shape[-1]
    lead = tuple(g.shape[:-2])
    jac = {}
    if "weight" in roles:  # the outputs folded into the rows of one matmul per example
        gt = xp.permute_dims(xp.reshape(g, (g.shape[0], -1, s, f)), (0, 1, 3, 2))  # (N, O, F, S)
        grad = xp.matmul(xp.reshape(gt, (g.shape[0], -1, s)), x)  # (N, O·F, in)
        jac["weight"] = xp.reshape(grad, (*lead, f * n_in))
    if "bias" in roles:
        jac["bias"] = xp.sum(g, axis=-2)
    return jac


class Dense(Rule):
    kind = "dense"
    native_gradients = True
    matmul_role = "weight"

    def kernel(self, xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
        return kernel(xp, x1, g1, x2, g2, axes, roles)

    def gradients(self, xp: Any, x: Any, g: Any, roles: set[str], shapes: Mapping[str, tuple]) -> dict[str, Any]:
        return gradients(xp, x, g, roles)

    def sketch_factors(self, shapes: Mapping[str, tuple], x: Any, g: Any) -> dict[str, tuple[int, ...]]:
        """The weight's column is s⊗r (s over the F outputs, r over the inputs); the bias's one vector."""
        return {role: (g.shape[-1], x.shape[-1]) if role == "weight" else (g.shape[-1],) for role in shapes}

    def project(self, xp: Any, x: Any, g: Any, shapes: Mapping[str, tuple], signs: Mapping[str, list[Any]]) -> Any:
        """(x⊗g)·(r⊗s) = Σ_s (g_s·s)(x_s·r): tokens × (F + in) per column, not F × in."""
        total = 0
        if "weight" in shapes:
            s_, r = signs["weight"]
            gs = xp.matmul(g, s_)  # (N, *out, S, c)
            xr = xp.matmul(x, r)  # (N, S, c)
            total = xp.sum(gs * xp.reshape(xr, (x.shape[0], *([1] * (len(g.shape) - 3)), *xr.shape[1:])), axis=-2)
        if "bias" in shapes:
            total = total + xp.matmul(xp.sum(g, axis=-2), signs["bias"][0])
        return total

    def forward_flops(self, tokens: int, features: int, sizes: Mapping[str, int]) -> float:
        weight = sizes.get("weight", 0)
        return 2.0 * tokens * weight if weight > features else 0.0  # fan-in 1 (a bias add in JAX): elementwise

    def cost(self, layer: Any, sizes: CallSizes) -> tuple[float, float]:
        found = orders(sizes.n1, sizes.n2, layer.tokens, layer.fan_in + 1, layer.features, sizes.out_shape, sizes.axes)
        _, flops, elements = min(found.values())
        return flops, elements

    def describe(self, layer: Any, sizes: CallSizes) -> str:
        found = orders(sizes.n1, sizes.n2, layer.tokens, layer.fan_in, layer.features, sizes.out_shape, sizes.axes)
        order = min(found, key=lambda k: found[k][0])
        return f"dense rule, {order.replace('_', '-')} order"


RULE = Dense()
