"""Embeddings y_s = E[id_s]: Θ = Σ_{s,t} [id1_s = id2_t ≥ 0] (g1_s·g2_t). The structured input is
the integer ids; an id of -1 marks a row without gradient (a padding row), matching nothing. A
table tied to an output projection is summed from both kinds' per-example gradients (both in the
table's (vocabulary, F) layout)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..arrays import device_of
from ..axes import KernelAxes
from ..sizes import CallSizes, pair_entries
from .base import Rule
from .pairwise import pair_weights, pairwise


def kernel(xp: Any, ids1: Any, g1: Any, ids2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
    """``ids`` (N, S) integers (-1: no gradient), ``g`` (N, *out, S, F)."""
    ids2 = xp.where(ids2 < 0, ids2 * 0 - 2, ids2)  # -1 (no gradient) on one side never equals -2 on the other
    return pairwise(xp, g1, g2, pair_weights(xp, ids1, ids2, axes, equal=True, dtype=g1.dtype), axes)


def gradients(xp: Any, ids: Any, g: Any, roles: set[str], shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """Per-example gradient Σ_s onehot(id_s) ⊗ g_s of the table, laid out (vocabulary, F):
    (N, *out, V·F). ``shapes`` gives the table's shape."""
    n, s = ids.shape
    *rows, f = shapes["table"]  # a broadcast parameter's rows may span several axes
    vocabulary = math.prod(rows)
    lead = tuple(g.shape[:-2])
    device = device_of(ids)
    rows_ids = xp.arange(vocabulary, dtype=ids.dtype, **({} if device is None else {"device": device}))
    onehot = xp.astype(xp.reshape(ids, (n, s, 1)) == xp.reshape(rows_ids, (1, 1, -1)), g.dtype)  # (N, S, V)
    rows = xp.reshape(xp.permute_dims(xp.reshape(g, (n, -1, s, f)), (0, 2, 1, 3)), (n, s, -1))  # (N, S, O·F)
    grad = xp.matmul(xp.permute_dims(onehot, (0, 2, 1)), rows)  # (N, V, O·F)
    grad = xp.permute_dims(xp.reshape(grad, (n, vocabulary, -1, f)), (0, 2, 1, 3))  # (N, O, V, F)
    return {"table": xp.reshape(grad, (*lead, vocabulary * f))}


class Embedding(Rule):
    kind = "embedding"
    native_gradients = True

    def structured_input(self, xp: Any, inputs: Any, n: int, tokens: int, order: list[int] | None) -> Any:
        return xp.reshape(inputs, (n, tokens))

    def kernel(self, xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
        return kernel(xp, x1, g1, x2, g2, axes, roles)

    def gradients(self, xp: Any, x: Any, g: Any, roles: set[str], shapes: Mapping[str, tuple]) -> dict[str, Any]:
        return gradients(xp, x, g, roles, shapes)

    def sketch_factors(self, shapes: Mapping[str, tuple], x: Any, g: Any) -> dict[str, tuple[int, ...]]:
        """The table's column is r⊗s (r over its rows, s over the F features)."""
        *rows, f = shapes["table"]
        return {"table": (math.prod(rows), f)}

    def project(self, xp: Any, x: Any, g: Any, shapes: Mapping[str, tuple], signs: Mapping[str, list[Any]]) -> Any:
        """Σ_s r[id_s]·(g_s·s), a padding id (-1) contributing nothing: no V-sized gradient formed."""
        r, s_ = signs["table"]
        n, tokens = x.shape
        valid = x >= 0
        rows = xp.take(r, xp.reshape(xp.where(valid, x, x * 0), (-1,)), axis=0)  # (N·S, c)
        rows = xp.reshape(rows, (n, tokens, -1)) * xp.reshape(xp.astype(valid, r.dtype), (n, tokens, 1))
        gs = xp.matmul(g, s_)  # (N, *out, S, c)
        return xp.sum(gs * xp.reshape(rows, (n, *([1] * (len(g.shape) - 3)), tokens, -1)), axis=-2)

    def cost(self, layer: Any, sizes: CallSizes) -> tuple[float, float]:
        flops = 2.0 * sizes.pairs * layer.tokens**2 * layer.features
        return flops, float(sizes.examples * pair_entries(sizes.axes, sizes.out_shape) * layer.tokens**2)


RULE = Embedding()
