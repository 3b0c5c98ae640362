"""The sizes of one kernel call that every cost formula reads (cost model, rules, ``explain``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .axes import KernelAxes


def output_pairs(axes: KernelAxes, out_shape: tuple[int, ...]) -> int:
    """Output pairs contracted per example pair: O_a² for kept axes, O_a for reduced ones."""
    return math.prod(n if (a in axes.trace or a in axes.diagonal) else n * n for a, n in enumerate(out_shape, start=1))


def pair_entries(axes: KernelAxes, out_shape: tuple[int, ...]) -> int:
    """Kernel entries per example pair: O_a² for kept axes, O_a for diagonal ones, 1 traced."""
    return math.prod(n * n if a in axes.kept else n if a in axes.diagonal else 1 for a, n in enumerate(out_shape, 1))


@dataclass(frozen=True)
class CallSizes:
    """N1, N2 (``reuse``: x2 is x1, its work reused), the per-example output shape and the axes."""

    n1: int
    n2: int
    reuse: bool
    out_shape: tuple[int, ...]
    axes: KernelAxes

    @classmethod
    def of(cls, n1: int, n2: int | None, out_shape: tuple[int, ...], axes: KernelAxes) -> CallSizes:
        """Sizes of a call with ``n2=None`` meaning x2 = x1."""
        return cls(n1, n1 if n2 is None else n2, n2 is None, tuple(out_shape), axes)

    @property
    def diagonal_batch(self) -> bool:
        """Whether x1[i] pairs with x2[i] only (``diagonal_axes=(0, ...)``)."""
        return 0 in self.axes.diagonal

    @property
    def nx(self) -> int:
        """Examples differentiated: N1, plus N2 unless x2 reuses x1."""
        return self.n1 if self.reuse else self.n1 + self.n2

    @property
    def outputs(self) -> int:
        """O, the outputs per example."""
        return math.prod(self.out_shape)

    @property
    def examples(self) -> int:
        """Example pairs in the kernel."""
        return self.n1 if self.diagonal_batch else self.n1 * self.n2

    @property
    def pairs(self) -> int:
        """Output pairs contracted over all example pairs."""
        return self.examples * output_pairs(self.axes, self.out_shape)

    @property
    def entries(self) -> int:
        """Kernel entries."""
        return self.examples * pair_entries(self.axes, self.out_shape)
