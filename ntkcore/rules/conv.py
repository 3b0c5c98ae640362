"""Convolutions (grouped and depthwise included) as a dense layer on each output position's
input patch, per group. Two orders, as for dense layers: the per-example weight gradients
Σ_s g_sᵀ·patch_s contracted (cheap where the weights are few: early, wide layers), or the
pairwise form Σ_g Σ_{s,t} (patch1_{s,g}·patch2_{t,g}) (g1_{s,g}·g2_{t,g}), which never forms
a gradient and pays S² per pair instead (the deep layers of a CNN, where S is small and the
weights many).

Adapters whose framework differentiates convolutions faster than patches and a matmul take the
per-example gradients from it (``Capture.framework_gradients``); where they can also form the
patches on request (``Capture.deferred_inputs``) the core takes the pairwise order wherever it
is the cheaper one (:func:`pairwise_pays`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..axes import KernelAxes
from ..sizes import CallSizes, output_pairs, pair_entries
from .base import MEMORY_WEIGHT, Rule, per_example
from .pairwise import ones, pairwise


def orders(
    n1: int, n2: int, s: int, k: int, c: int, groups: int, out_shape: tuple[int, ...], axes: KernelAxes
) -> dict[str, tuple[float, float, float]]:
    """``order -> (score, FLOPs, intermediate elements)`` for S positions, patches of K per group,
    C output channels in ``groups`` groups: scored as :func:`ntkcore.rules.dense.orders`."""
    examples = n1 if 0 in axes.diagonal else n1 * n2
    pairs = examples * output_pairs(axes, out_shape)
    entries = examples * pair_entries(axes, out_shape)
    # the cotangents' token products, the patches' Gram matrices, their product summed
    pairwise_ = pairs * s * s * (c + groups) + examples * s * s * k * groups
    gradients_ = (n1 + n2) * math.prod(out_shape) * c * k
    per_example_ = gradients_ * s + pairs * c * k
    written = entries * s * s * groups
    return {
        "pairwise": (pairwise_ + MEMORY_WEIGHT * written, 2.0 * pairwise_, float(written)),
        "per_example": (per_example_ + MEMORY_WEIGHT * gradients_, 2.0 * per_example_, float(gradients_)),
    }


def pairwise_pays(layer: Any, sizes: CallSizes) -> bool:
    """Whether the pairwise order beats per-example gradients for this layer
    (:class:`~ntkcore.model_shape.LayerShape`) at these sizes."""
    found = _layer_orders(layer, sizes)
    return found["pairwise"][0] < found["per_example"][0]


def kronecker_pays(s: int, k: int, c: int, groups: int) -> bool:
    """Whether a sketch's Kronecker-structured columns cost less than plain ones on the weight
    gradient: S·(C + G·K) per example, output and column against C·K (the deep layers of a CNN,
    where positions are few and weights many)."""
    return s * (c + groups * k) < c * k


def _layer_orders(layer: Any, sizes: CallSizes) -> dict[str, tuple[float, float, float]]:
    fan_in = max(layer.fan_in, 1)
    return orders(sizes.n1, sizes.n2, layer.tokens, fan_in, layer.features, layer.groups, sizes.out_shape, sizes.axes)


def _patch_gram(xp: Any, x1: Any, x2: Any, axes: KernelAxes) -> Any:
    """patch1_{s,g}·patch2_{t,g}: (N1, N2, G, S, T), or (N, G, S, T) with a diagonal batch axis."""
    if 0 in axes.diagonal:
        return xp.matmul(xp.permute_dims(x1, (0, 2, 1, 3)), xp.permute_dims(x2, (0, 2, 3, 1)))
    (n1, s, groups, k), (n2, t) = x1.shape, x2.shape[:2]
    a = xp.reshape(xp.permute_dims(x1, (2, 0, 1, 3)), (groups, n1 * s, k))
    b = xp.reshape(xp.permute_dims(x2, (2, 3, 0, 1)), (groups, k, n2 * t))
    gram = xp.reshape(xp.matmul(a, b), (groups, n1, s, n2, t))
    return xp.permute_dims(gram, (1, 3, 0, 2, 4))


def kernel(
    xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str], order: str | None = None
) -> Any:
    """``x`` (N, S, G, K) holds each output position's input patch per group, ``g`` (N, *out, S, C)
    with C = G·F output channels, grouped contiguously. ``order`` forces ``"pairwise"`` or
    ``"per_example"``; by default the one :func:`orders` scores lower."""
    n1, s, groups, k = x1.shape
    out_shape = tuple(g1.shape[1:-2])
    costs = orders(n1, x2.shape[0], s, k, g1.shape[-1], groups, out_shape, axes)
    if order == "pairwise" or (order is None and costs["pairwise"][0] < costs["per_example"][0]):
        if "weight" not in roles:  # a bias alone: every pair of positions, all channels at once
            return pairwise(xp, g1, g2, ones(xp, x1, x2, axes, g1), axes)
        weights = _patch_gram(xp, x1, x2, axes)
        if "bias" in roles:
            weights = weights + 1
        split = [(*g.shape[:-1], groups, g.shape[-1] // groups) for g in (g1, g2)]
        return pairwise(xp, xp.reshape(g1, split[0]), xp.reshape(g2, split[1]), weights, axes, grouped=True)
    return per_example(xp, gradients(xp, x1, g1, roles), gradients(xp, x2, g2, roles), axes)


def gradients(xp: Any, x: Any, g: Any, roles: set[str]) -> dict[str, Any]:
    """Per-example gradients from the patches: weight (N, *out, G·F·K), bias (N, *out, C)."""
    n, s, groups, k = x.shape
    lead = tuple(g.shape[:-2])
    jac = {}
    if "weight" in roles:  # one matmul per example and group, the outputs folded into the rows
        f = g.shape[-1] // groups
        gg = xp.reshape(g, (n, -1, s, groups, f))  # (N, O, S, G, F)
        gg = xp.reshape(xp.permute_dims(gg, (0, 3, 1, 4, 2)), (n, groups, -1, s))  # (N, G, O·F, S)
        grad = xp.matmul(gg, xp.permute_dims(x, (0, 2, 1, 3)))  # (N, G, O·F, K)
        grad = xp.permute_dims(xp.reshape(grad, (n, groups, -1, f, k)), (0, 2, 1, 3, 4))  # (N, O, G, F, K)
        jac["weight"] = xp.reshape(grad, (*lead, -1))
    if "bias" in roles:
        jac["bias"] = xp.sum(g, axis=-2)
    return jac


class Conv(Rule):
    kind = "conv"
    matmul_role = "weight"

    def structured_input(self, xp: Any, inputs: Any, n: int, tokens: int, order: list[int] | None) -> Any:
        return xp.reshape(inputs, (n, tokens, *inputs.shape[-2:]))  # patches (N, 1, S, G, K) from the adapter

    def kernel(self, xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
        return kernel(xp, x1, g1, x2, g2, axes, roles)

    def sketch_factors(self, shapes: Mapping[str, tuple], x: Any, g: Any) -> dict[str, tuple[int, ...]]:
        """The weight's column is s⊗r (s over the C output channels, r over a patch's K inputs,
        shared by the groups) where :func:`kronecker_pays`; else one vector of its size."""
        _, s, groups, k = x.shape
        c = g.shape[-1]
        if "weight" not in shapes or not kronecker_pays(s, k, c, groups):
            return super().sketch_factors(shapes, x, g)
        return {role: (c, k) if role == "weight" else (c,) for role in shapes}

    def sketch_pays(self, layer: Any) -> bool:
        """Patches formed on request pay where the Kronecker columns do."""
        return kronecker_pays(layer.tokens, max(layer.fan_in, 1), layer.features, layer.groups)

    def project(self, xp: Any, x: Any, g: Any, shapes: Mapping[str, tuple], signs: Mapping[str, list[Any]]) -> Any:
        """Kronecker columns: Σ_{s,g} (g_{s,g}·s_g)(patch_{s,g}·r), no gradient formed; plain
        ones: the per-example gradients from the patches times the signs (their layout is the
        sketch's own basis: any fixed order of independent signs is as good)."""
        if len(signs.get("weight", ())) != 2:
            grads = gradients(xp, x, g, set(shapes))
            return sum(xp.matmul(grads[role], signs[role][0]) for role in shapes)
        n, s, groups = x.shape[:3]
        lead = tuple(g.shape[:-2])  # (N, *out)
        s_, r = signs["weight"]
        f = g.shape[-1] // groups
        gg = xp.reshape(g, (*lead, s, groups, f))
        gg = xp.permute_dims(gg, (*range(len(lead)), len(lead) + 1, len(lead), len(lead) + 2))  # (N, *out, G, S, F)
        gs = xp.matmul(gg, xp.reshape(s_, (groups, f, s_.shape[-1])))  # (N, *out, G, S, c)
        xr = xp.matmul(xp.permute_dims(x, (0, 2, 1, 3)), r)  # (N, G, S, c)
        xr = xp.reshape(xr, (n, *([1] * (len(lead) - 1)), *xr.shape[1:]))
        total = xp.sum(gs * xr, axis=(-3, -2))
        if "bias" in shapes:
            total = total + xp.matmul(xp.sum(g, axis=-2), signs["bias"][0])
        return total

    def forward_flops(self, tokens: int, features: int, sizes: Mapping[str, int]) -> float:
        weight = sizes.get("weight", 0)
        return 2.0 * tokens * weight if weight > features else 0.0

    def cost(self, layer: Any, sizes: CallSizes) -> tuple[float, float]:
        _, flops, elements = min(_layer_orders(layer, sizes).values())
        return flops, elements

    def beats_framework(self, layer: Any, sizes: CallSizes) -> bool:
        """The framework's gradients cost what the per-example order does: the pairwise order
        beats them where it beats that order."""
        return pairwise_pays(layer, sizes)

    def describe(self, layer: Any, sizes: CallSizes) -> str:
        found = _layer_orders(layer, sizes)
        return f"conv rule, {min(found, key=lambda k: found[k][0]).replace('_', '-')} order"


RULE = Conv()
