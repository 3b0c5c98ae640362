"""Convolutions (grouped and depthwise included) as a dense layer on each output position's
input patch, per group: the per-example weight gradients Σ_s g_sᵀ·patch_s are contracted (the
pairwise form costs S² per pair, more than the few weights of a convolution).

Adapters whose framework differentiates convolutions faster than patches and a matmul take
those gradients from it instead (``Capture.framework_gradients``) and record no patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..axes import KernelAxes
from .base import Rule, per_example


def kernel(xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
    """``x`` (N, S, G, K) holds each output position's input patch per group, ``g`` (N, *out, S, C)
    with C = G·F output channels, grouped contiguously."""
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

    def project(self, xp: Any, x: Any, g: Any, shapes: Mapping[str, tuple], signs: Mapping[str, list[Any]]) -> Any:
        """The per-example gradients from the patches times the signs (their layout is the
        sketch's own basis: any fixed order of independent signs is as good)."""
        grads = gradients(xp, x, g, set(shapes))
        return sum(xp.matmul(grads[role], signs[role][0]) for role in shapes)

    def forward_flops(self, tokens: int, features: int, sizes: Mapping[str, int]) -> float:
        weight = sizes.get("weight", 0)
        return 2.0 * tokens * weight if weight > features else 0.0


RULE = Conv()
