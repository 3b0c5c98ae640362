"""Trace and diagonal axes: validation, the kernel's shape, and moving labelled axes.

Convention: for f(x) of shape (N, *out) the kernel has shape (N1, N2, *out, *out). An axis in
``trace_axes`` is summed over its pair (a true trace, not neural-tangents' mean) and dropped;
an axis in ``diagonal_axes`` keeps only the diagonal of its pair and appears once, in the first
group. Axes count over f's output including the batch axis 0; negative axes count from its
end. Example: out (N, T, O), ``diagonal_axes=(0,)``, ``trace_axes=(-1,)`` gives (N, T, T).

Internally every kernel axis carries a label: ``("d", a)`` for the single copy of a diagonal
axis ``a``, ``(1, a)`` / ``(2, a)`` for axis ``a`` of the x1 / x2 side.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Label = tuple[Any, int]


def _as_tuple(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}") from None
    for item in items:
        try:
            operator.index(item)
        except TypeError:
            raise TypeError(f"{name} must contain ints, got {item!r} in {value!r}") from None
        if isinstance(item, bool):
            raise TypeError(f"{name} must contain ints, got {item!r} in {value!r}")
    return tuple(int(i) for i in items)


@dataclass(frozen=True)
class KernelAxes:
    """Validated trace/diagonal axes for an output of ``ndim`` axes (batch axis included)."""

    ndim: int
    trace: tuple[int, ...] = ()
    diagonal: tuple[int, ...] = ()

    @classmethod
    def create(cls, trace_axes: Any, diagonal_axes: Any, output_shape: Sequence[int]) -> KernelAxes:
        """Normalise and check the axes against f's output shape ``(N, *out)``."""
        ndim = len(output_shape)
        shape_text = f"f's output of shape {tuple(output_shape)} (ndim {ndim})"
        normalised = {}
        for name, value in (("trace_axes", trace_axes), ("diagonal_axes", diagonal_axes)):
            axes = []
            for axis in _as_tuple(value, name):
                if not -ndim <= axis < ndim:
                    raise ValueError(
                        f"{name} contains axis {axis}, out of range for {shape_text}; "
                        f"valid axes are {-ndim}..{ndim - 1}"
                    )
                axis %= ndim
                if axis in axes:
                    raise ValueError(f"{name} names axis {axis} twice ({value!r})")
                axes.append(axis)
            normalised[name] = tuple(sorted(axes))
        both = set(normalised["trace_axes"]) & set(normalised["diagonal_axes"])
        if both:
            raise ValueError(
                f"axis {sorted(both)[0]} is in both trace_axes and diagonal_axes; "
                "an axis pair is either summed or reduced to its diagonal, not both"
            )
        if 0 in normalised["trace_axes"]:
            raise ValueError(
                "trace_axes may not contain the batch axis 0; use diagonal_axes=(0,) for "
                "per-example kernels and sum them yourself if you need the trace"
            )
        return cls(ndim, normalised["trace_axes"], normalised["diagonal_axes"])

    @property
    def kept(self) -> tuple[int, ...]:
        """Axes kept on both sides (neither traced nor diagonal)."""
        return tuple(a for a in range(self.ndim) if a not in self.trace and a not in self.diagonal)

    def final_labels(self) -> list[Label]:
        """Labels of the kernel's axes, in the documented output order."""
        batch: list[Label] = [("d", 0)] if 0 in self.diagonal else [(1, 0), (2, 0)]
        first = [("d", a) if a in self.diagonal else (1, a) for a in range(1, self.ndim) if a not in self.trace]
        second = [(2, a) for a in self.kept if a != 0]
        return batch + first + second

    def kernel_shape(self, shape1: Sequence[int], shape2: Sequence[int]) -> tuple[int, ...]:
        """The kernel's shape for outputs of shapes ``shape1`` (x1) and ``shape2`` (x2)."""
        sizes = {1: shape1, 2: shape2, "d": shape1}
        return tuple(sizes[side][a] for side, a in self.final_labels())


def permute_to(xp: Any, array: Any, labels: list[Label], target: list[Label]) -> Any:
    """Transpose ``array`` whose axes carry ``labels`` into the order of ``target``."""
    order = tuple(labels.index(label) for label in target)
    if order == tuple(range(len(order))):
        return array
    return xp.permute_dims(array, order)


def reduce_pairs(xp: Any, kernel: Any, labels: list[Label], axes: KernelAxes) -> Any:
    """From a kernel holding both sides of an axis, take diagonals and traces as asked.

    ``kernel`` may already be diagonal in some axes (labels ``("d", a)``); any axis present as
    both ``(1, a)`` and ``(2, a)`` and listed in ``axes.trace`` or ``axes.diagonal`` is reduced.
    Returns the kernel in the order of ``axes.final_labels()``.
    """
    from ._xp import diagonal_last2

    labels = list(labels)
    for a in sorted(set(axes.trace) | set(axes.diagonal)):
        if (1, a) not in labels:
            continue
        rest = [label for label in labels if label not in ((1, a), (2, a))]
        kernel = permute_to(xp, kernel, labels, [*rest, (1, a), (2, a)])
        kernel = diagonal_last2(xp, kernel)
        if a in axes.trace:
            kernel = xp.sum(kernel, axis=-1)
            labels = rest
        else:
            labels = [*rest, ("d", a)]
    return permute_to(xp, kernel, labels, axes.final_labels())
