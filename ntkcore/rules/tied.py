"""A table tied between an embedding and a dense layer (a language model's input embedding
reused as its output projection): the cross terms between the two uses, in pairwise form.

With W (V, d) read as rows by the embedding (y_t = W[id_t]) and multiplied by the dense layer
(z_s = W·x_s), the per-example gradient is Σ_t onehot(id_t)⊗e_t + Σ_s g_s⊗x_s (e: the
embedding output's cotangent, g: the dense output's). The kernel is each use's own rule plus
the cross terms ⟨Σ_s g1_s⊗x1_s, Σ_t onehot(id2_t)⊗e2_t⟩ = Σ_{s,t} g1_s[id2_t]·(x1_s·e2_t) (and the
mirror), so no V·d-sized gradient is ever formed: the cost is N1·N2·O²·S·T, not N·O·V·d.
"""

from __future__ import annotations

import math
from typing import Any

from ..axes import KernelAxes, Label, reduce_pairs


def cross(xp: Any, g: Any, x: Any, ids: Any, e: Any, axes: KernelAxes, dense_first: bool) -> Any:
    """Σ_{s,t} g_s[id_t]·(x_s·e_t) for every pair of examples, on the dense layer's side
    (``g`` (N_D, *out, S, V), ``x`` (N_D, S, d)) and the embedding's (``ids`` (N_E, T), -1 for a
    row without gradient, ``e`` (N_E, *out, T, d)); ``dense_first``: the dense side is x1's.
    Returns the kernel in the order of ``axes.final_labels()``."""
    out = tuple(g.shape[1:-2])
    n_d, s, vocabulary = g.shape[0], g.shape[-2], g.shape[-1]
    n_e, t = ids.shape
    o = math.prod(out)
    valid = xp.astype(xp.reshape(ids >= 0, (-1,)), g.dtype)
    rows = xp.reshape(xp.where(ids >= 0, ids, ids * 0), (-1,))
    picked = xp.take(xp.reshape(g, (n_d, o, s, vocabulary)), rows, axis=-1) * valid  # (N_D, O, S, N_E·T)
    a = xp.permute_dims(xp.reshape(picked, (n_d, o, s, n_e, t)), (0, 3, 1, 2, 4))  # (N_D, N_E, O, S, T)
    dots = xp.matmul(xp.reshape(x, (n_d * s, -1)), xp.permute_dims(xp.reshape(e, (n_e * o * t, -1)), (1, 0)))
    b = xp.permute_dims(xp.reshape(dots, (n_d, s, n_e, o, t)), (0, 2, 3, 1, 4))  # (N_D, N_E, O, S, T)
    sides = (1, 2) if dense_first else (2, 1)
    outputs = range(1, len(out) + 1)
    if all(axis not in axes.kept for axis in outputs):  # every output axis traced or diagonal: o1 = o2
        kernel = xp.sum(xp.reshape(a * b, (n_d, n_e, *out, s * t)), axis=-1)
        labels: list[Label] = [(sides[0], 0), (sides[1], 0), *(("d", axis) for axis in outputs)]
        traced = [i for i, label in enumerate(labels) if label[0] == "d" and label[1] in axes.trace]
        if traced:
            kernel = xp.sum(kernel, axis=tuple(traced))
            labels = [label for i, label in enumerate(labels) if i not in traced]
        return reduce_pairs(xp, kernel, labels, axes)
    a = xp.reshape(a, (n_d, n_e, o, s * t))
    b = xp.permute_dims(xp.reshape(b, (n_d, n_e, o, s * t)), (0, 1, 3, 2))
    kernel = xp.reshape(xp.matmul(a, b), (n_d, n_e, *out, *out))  # (N_D, N_E, *out_D, *out_E)
    labels = [(sides[0], 0), (sides[1], 0), *((sides[0], axis) for axis in outputs)]
    labels += [(sides[1], axis) for axis in outputs]
    return reduce_pairs(xp, kernel, labels, axes)


def pairs_of(shared: list[Any]) -> dict[str, dict[str, list[Any]]] | None:
    """The calls of ``shared`` (:class:`~ntkcore.protocol.LayerUse`, calls touching a parameter
    used by layers of different kinds) by tied table and kind, when each table is read by
    embedding calls and multiplied by dense calls, each kind's calls with the same parameters;
    else ``None`` (the engine then sums per-example gradients)."""
    kinds: dict[str, set[str]] = {}
    for use in shared:
        for name in use.params.values():
            kinds.setdefault(name, set()).add(use.kind)
    tied: dict[str, dict[str, list[Any]]] = {}
    for use in shared:
        names = [name for name in use.params.values() if len(kinds[name]) > 1]
        role = {"dense": "weight", "embedding": "table"}.get(use.kind)
        if len(names) != 1 or role is None or use.params.get(role) != names[0]:
            return None
        tied.setdefault(names[0], {}).setdefault(use.kind, []).append(use)
    for by_kind in tied.values():
        if set(by_kind) != {"dense", "embedding"}:
            return None
        if any(len({(tuple(sorted(u.params.items())), u.feature_axis) for u in uses}) > 1 for uses in by_kind.values()):
            return None
    return tied
