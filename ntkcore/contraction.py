"""Θ = Σ_params J1·J2ᵀ for per-example Jacobians, with trace and diagonal axes folded into one
batched matmul: the contraction every implementation and rule ends in.

Traced axes join the contracted dimension and diagonal axes become a batch dimension of the
matmul, so neither costs more than its result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .axes import KernelAxes, permute_to

# Contracted elements per partial product. A float32 matmul with an inner dimension of ~1e8
# (O·P of one wide layer) accumulates error that grows with its length (seen: 1e-2 relative
# on CPU torch); summing partial products over blocks keeps it at float32 level.
CONTRACT_BLOCK = 1 << 20


def _matmul_blocked(xp: Any, a: Any, b: Any) -> Any:
    """a·bᵀ for a (D, K1, T), b (D, K2, T), summed over blocks of T."""
    t = a.shape[-1]
    total = None
    for start in range(0, t, CONTRACT_BLOCK):
        stop = min(start + CONTRACT_BLOCK, t)
        part = xp.matmul(a[..., start:stop], xp.permute_dims(b[..., start:stop], (0, 2, 1)))
        total = part if total is None else total + part
    return total


def contract(
    xp: Any,
    jac1: Mapping[str, Any],
    jac2: Mapping[str, Any],
    axes: KernelAxes,
    shape1: tuple[int, ...],
    shape2: tuple[int, ...],
) -> Any:
    """Θ = Σ_params J1·J2ᵀ for Jacobians ``name -> (N, *out, *param.shape)``.

    ``shape1``/``shape2`` are f's output shapes (N, *out) on each side.
    """
    if set(jac1) != set(jac2):
        raise ValueError("the two Jacobian maps must have the same parameter names")
    d_axes, k_axes, t_axes = axes.diagonal, axes.kept, axes.trace
    order = (*d_axes, *k_axes, *t_axes)
    sizes_d = [shape1[a] for a in d_axes]
    total = None
    for name in jac1:
        operands = []
        for jac, shape in ((jac1[name], shape1), (jac2[name], shape2)):
            n_param = math.prod(jac.shape[axes.ndim :])
            j = xp.reshape(jac, (*shape, n_param))
            j = xp.permute_dims(j, (*order, axes.ndim))
            k_size = math.prod(shape[a] for a in k_axes)
            t_size = math.prod(shape[a] for a in t_axes) * n_param
            operands.append(xp.reshape(j, (math.prod(sizes_d), k_size, t_size)))
        block = _matmul_blocked(xp, operands[0], operands[1])
        total = block if total is None else total + block
    labels = [("d", a) for a in d_axes] + [(1, a) for a in k_axes] + [(2, a) for a in k_axes]
    sizes = sizes_d + [shape1[a] for a in k_axes] + [shape2[a] for a in k_axes]
    return permute_to(xp, xp.reshape(total, tuple(sizes)), labels, axes.final_labels())


def jacobian_shapes(jac1: Mapping[str, Any], jac2: Mapping[str, Any], output_ndim: int) -> tuple[tuple, tuple]:
    """f's output shapes (N, *out) on the two sides of explicit Jacobians, checked consistent."""
    if not jac1:
        raise ValueError("jac1 is empty: expected a map name -> Jacobian array")
    if set(jac1) != set(jac2):
        raise ValueError(f"jac1 and jac2 must have the same parameter names, got {sorted(jac1)} and {sorted(jac2)}")
    first1, first2 = next(iter(jac1.values())), jac2[next(iter(jac1))]
    shape1, shape2 = tuple(first1.shape[:output_ndim]), tuple(first2.shape[:output_ndim])
    for name in jac1:
        for label, jac, shape in (("jac1", jac1[name], shape1), ("jac2", jac2[name], shape2)):
            if tuple(jac.shape[:output_ndim]) != shape:
                raise ValueError(f"{label}[{name!r}] has shape {tuple(jac.shape)}, expected a leading {shape}")
        if tuple(jac1[name].shape[output_ndim:]) != tuple(jac2[name].shape[output_ndim:]):
            raise ValueError(f"jac1[{name!r}] and jac2[{name!r}] differ in their parameter axes")
    if shape1[1:] != shape2[1:]:
        raise ValueError(f"jac2 has output shape {shape2[1:]} but jac1 has {shape1[1:]}")
    return shape1, shape2


def contract_by_layer(
    xp: Any,
    jac1: Mapping[str, Any],
    jac2: Mapping[str, Any],
    axes: KernelAxes,
    shape1: tuple[int, ...],
    shape2: tuple[int, ...],
    layers: Mapping[str, list[str]],
) -> dict[str, Any]:
    """Layer name -> the contraction of that layer's parameters (``layers``: layer -> names)."""
    return {
        layer: contract(xp, {n: jac1[n] for n in names}, {n: jac2[n] for n in names}, axes, shape1, shape2)
        for layer, names in layers.items()
    }
