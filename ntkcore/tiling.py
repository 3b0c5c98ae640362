"""Kernels over many examples, tile by tile: the plan, the mirror of a tile, the assembly.

x1 and x2 are cut into tiles of at most B examples; tile (i, j) is the kernel between x1's
tile i and x2's tile j, computed by the ordinary (untiled) kernel. With ``x2=None`` the kernel
is symmetric: only tiles with j ≥ i are computed (the diagonal ones with x2=None, reusing their
work) and tile (j, i) is tile (i, j) with its two sides swapped. With the batch axis diagonal
(``diagonal_axes=(0, ...)``) only the diagonal tiles exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .axes import KernelAxes, Label


@dataclass(frozen=True)
class Tile:
    """Kernel tile (i, j): rows ``x1[rows]``, columns ``x2[cols]`` (x1's when ``x2=None``)."""

    i: int
    j: int
    rows: slice
    cols: slice
    symmetric: bool  # a diagonal tile of x2=None: computed as kernel(x1[rows]) alone

    @property
    def name(self) -> str:
        return f"{self.i}.{self.j}"


def ranges(n: int, size: int) -> list[slice]:
    """``n`` examples in consecutive slices of at most ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"batch_size must be a positive number of examples, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def plan(n1: int, n2: int | None, size: int, axes: KernelAxes) -> list[Tile]:
    """The tiles to compute, row by row. ``n2=None``: x2 is x1 (mirrored tiles left out)."""
    rows = ranges(n1, size)
    if 0 in axes.diagonal:  # x1[i] pairs with x2[i] only
        return [Tile(i, i, r, r, n2 is None) for i, r in enumerate(rows)]
    if n2 is None:
        return [Tile(i, j, r, c, i == j) for i, r in enumerate(rows) for j, c in enumerate(rows) if j >= i]
    return [Tile(i, j, r, c, False) for i, r in enumerate(rows) for j, c in enumerate(ranges(n2, size))]


def mirror_order(axes: KernelAxes) -> tuple[int, ...]:
    """The axis order that turns tile (i, j) of a symmetric kernel into tile (j, i)."""
    labels = axes.final_labels()

    def swap(label: Label) -> Label:
        side, axis = label
        return ({1: 2, 2: 1}.get(side, side), axis)

    return tuple(labels.index(swap(label)) for label in labels)


def index(tile: Tile, axes: KernelAxes, mirrored: bool = False) -> tuple[slice, ...]:
    """Where the tile (or its mirror) lands in the kernel."""
    if 0 in axes.diagonal:
        return (tile.rows,)
    return (tile.cols, tile.rows) if mirrored else (tile.rows, tile.cols)


def assemble(xp: Any, blocks: dict[tuple[int, int], Any], tiles: list[Tile], axes: KernelAxes) -> Any:
    """The whole kernel from its computed tiles (mirrors made here), in the blocks' namespace."""
    if 0 in axes.diagonal:
        return xp.concat([blocks[(t.i, t.j)] for t in tiles], axis=0)
    order = mirror_order(axes)
    n_rows = 1 + max(t.i for t in tiles)
    n_cols = 1 + max(t.j for t in tiles)
    rows = []
    for i in range(n_rows):
        row = []
        for j in range(n_cols):
            block = blocks.get((i, j))
            row.append(block if block is not None else xp.permute_dims(blocks[(j, i)], order))
        rows.append(xp.concat(row, axis=1))
    return xp.concat(rows, axis=0)
