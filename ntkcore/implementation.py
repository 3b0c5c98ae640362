"""The implementation names and the interim rule behind ``"auto"``."""

from __future__ import annotations

import enum
import math
from typing import Any

from .axes import KernelAxes


class Implementation(str, enum.Enum):
    """How the kernel is computed (arXiv 2206.08720); strings with the same values work too."""

    JACOBIAN_CONTRACTION = "jacobian_contraction"
    NTK_VECTOR_PRODUCTS = "ntk_vector_products"
    STRUCTURED = "structured"
    AUTO = "auto"

    @classmethod
    def parse(cls, value: Any) -> Implementation:
        """Accept an :class:`Implementation` or its string value; clear error otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(
            f"implementation={value!r} is not known; expected one of {[m.value for m in cls]} "
            "or an ntkcore.Implementation member"
        )


# Interim "auto" rule, until the cost-model issue lands. With a forward pass estimated at
# 2 FLOPs per parameter and a vjp or jvp at 3 forward passes (an MLP-like model):
#   Jacobian contraction ≈ (N1 + N2)·O·6P + N1·N2·C·P,  C = Π over output axes of
#       O_a² (kept), O_a (traced or diagonal)
#   NTK-vector products  ≈ N2·O·6P + N1·N2·O·6P   (N·O·6P with diagonal_axes=(0,))
# so contraction wins unless C > 6·O: large untraced outputs favour NTK-vector products.
FLOPS_PER_VJP_PER_PARAM = 6


def choose(n1: int, n2: int, out_shape: tuple[int, ...], axes: KernelAxes, n_params: int) -> Implementation:
    """Pick Jacobian contraction or NTK-vector products by the interim FLOP estimate."""
    size = math.prod(out_shape)
    pairs = math.prod(
        out_shape[a - 1] if (a in axes.trace or a in axes.diagonal) else out_shape[a - 1] ** 2
        for a in range(1, axes.ndim)
    )
    n_pairs = n1 if 0 in axes.diagonal else n1 * n2
    per_vjp = FLOPS_PER_VJP_PER_PARAM * n_params
    contraction = (n1 + n2) * size * per_vjp + n_pairs * pairs * n_params
    products = n2 * size * per_vjp + n_pairs * size * per_vjp
    return Implementation.JACOBIAN_CONTRACTION if contraction <= products else Implementation.NTK_VECTOR_PRODUCTS
