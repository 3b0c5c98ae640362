"""Affine normalisations y = x̂∘γ + β over the feature axis (LayerNorm, RMSNorm, GroupNorm,
BatchNorm in inference mode): per-example gradients Σ_s g_s∘x̂_s and Σ_s g_s contracted (cost
linear in the width). The adapter's structured input is x̂, in the layout of the output."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..axes import KernelAxes
from .base import Rule, per_example


def kernel(xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
    """``x`` (N, S, F) is x̂; ``roles`` ⊆ {scale, shift}."""
    return per_example(xp, gradients(xp, x1, g1, roles), gradients(xp, x2, g2, roles), axes)


def gradients(xp: Any, x: Any, g: Any, roles: set[str], shapes: Any = None) -> dict[str, Any]:
    """Per-example gradients Σ_s g_s∘x̂_s (scale) and Σ_s g_s (shift): (N, *out, F)."""
    jac = {}
    if "scale" in roles:
        xb = xp.reshape(x, (x.shape[0], *([1] * (len(g.shape) - 3)), *x.shape[1:]))
        jac["scale"] = xp.sum(g * xb, axis=-2)
    if "shift" in roles:
        jac["shift"] = xp.sum(g, axis=-2)
    return jac


class Affine(Rule):
    kind = "affine"
    native_gradients = True

    def structured_input(self, xp: Any, inputs: Any, n: int, tokens: int, order: list[int] | None) -> Any:
        if order is not None:  # x̂ has the layout of the output: its features move last too
            inputs = xp.permute_dims(inputs, (0, *(1 + i for i in order)))
        return xp.reshape(inputs, (n, tokens, inputs.shape[-1]))

    def kernel(self, xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
        return kernel(xp, x1, g1, x2, g2, axes, roles)

    def gradients(self, xp: Any, x: Any, g: Any, roles: set[str], shapes: Mapping[str, tuple]) -> dict[str, Any]:
        return gradients(xp, x, g, roles)

    def forward_flops(self, tokens: int, features: int, sizes: Mapping[str, int]) -> float:
        return 4.0 * tokens * features


RULE = Affine()
