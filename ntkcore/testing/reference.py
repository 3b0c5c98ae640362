"""A reference NTK contraction in numpy, written independently of the core's algorithms.

One ``numpy.einsum`` per parameter, with subscripts derived directly from the documented
axis convention, in float64 (or the inputs' dtype): the yardstick the conformance suite
holds every implementation to.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping

import numpy as np


def _normalise(axes: int | Iterable[int], ndim: int) -> set[int]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return {a % ndim for a in axes}


def reference_kernel(
    jac1: Mapping[str, np.ndarray],
    jac2: Mapping[str, np.ndarray] | None = None,
    *,
    output_ndim: int,
    trace_axes: int | Iterable[int] = (),
    diagonal_axes: int | Iterable[int] = (),
) -> np.ndarray:
    """Σ_params einsum(J1, J2) for Jacobians ``name -> (N, *out, P)`` (P flattened)."""
    jac2 = jac1 if jac2 is None else jac2
    trace, diagonal = _normalise(trace_axes, output_ndim), _normalise(diagonal_axes, output_ndim)
    letters = iter(string.ascii_letters)
    side1, side2, first, second, batch = [], [], [], [], []
    for axis in range(output_ndim):
        a = next(letters)
        b = a if axis in trace or axis in diagonal else next(letters)
        side1.append(a)
        side2.append(b)
        if axis in trace:
            continue
        if axis == 0:
            batch.extend([a] if axis in diagonal else [a, b])
        else:
            first.append(a)
            if axis not in diagonal:
                second.append(b)
    p = next(letters)
    subscripts = f"{''.join(side1)}{p},{''.join(side2)}{p}->{''.join(batch + first + second)}"
    return sum(np.einsum(subscripts, np.asarray(jac1[k]), np.asarray(jac2[k])) for k in jac1)
