"""The pairwise form shared by rules whose kernel is Σ_{s,t} w(s, t)·(g1_s·g2_t): dense layers
(w = x1_s·x2_t + 1[bias]) and embeddings (w = [id1_s = id2_t])."""

from __future__ import annotations

from typing import Any

from ..arrays import device_of
from ..axes import KernelAxes, Label, permute_to
from ..contraction import contract


def batch_labels(axes: KernelAxes) -> list[Label]:
    return [("d", 0)] if 0 in axes.diagonal else [(1, 0), (2, 0)]


def _token_products(xp: Any, g1: Any, g2: Any, axes: KernelAxes, grouped: bool) -> tuple[Any, list[Label]]:
    """(g1_s·g2_t) for every kept output pair, with the token axis (index ``axes.ndim``, after
    f's output axes) kept on both sides and, ``grouped``, the group axis after it paired with
    itself only; returns the array and its labels."""
    group = (axes.ndim + 1,) if grouped else ()
    ext = KernelAxes(axes.ndim + 1 + len(group), axes.trace, tuple(sorted((*axes.diagonal, *group))))
    product = contract(xp, {"g": g1}, {"g": g2}, ext, tuple(g1.shape[:-1]), tuple(g2.shape[:-1]))
    return product, ext.final_labels()


def pairwise(xp: Any, g1: Any, g2: Any, weights: Any, axes: KernelAxes, grouped: bool = False) -> Any:
    """Σ_{s,t} weights[.., s, t] · (g1_s·g2_t), with ``weights`` labelled batch + (1,S), (2,S).

    ``grouped``: g is (N, *out, S, G, F) and ``weights`` labelled batch + G + (1,S), (2,S), one
    token pairing per group (a grouped convolution); the groups are summed too.
    """
    product, labels = _token_products(xp, g1, g2, axes, grouped)
    token = axes.ndim
    head = [*batch_labels(axes), *([("d", token + 1)] if grouped else []), (1, token), (2, token)]
    rest = [label for label in labels if label not in head]
    product = permute_to(xp, product, labels, head + rest)
    weights = xp.reshape(weights, (*weights.shape, *([1] * len(rest))))
    n_batch = len(batch_labels(axes))
    total = xp.sum(product * weights, axis=tuple(range(n_batch, len(head))))
    return permute_to(xp, total, [*batch_labels(axes), *rest], axes.final_labels())


def pair_weights(xp: Any, a1: Any, a2: Any, axes: KernelAxes, *, equal: bool, dtype: Any) -> Any:
    """Per token pair: x1_s·x2_t (``equal=False``) or [id1_s = id2_t] (``equal=True``).

    ``a`` is (N, S, in) or (N, S); the result is (N1, N2, S, S), or (N, S, S) when the batch
    axis is diagonal.
    """
    if 0 in axes.diagonal:
        if equal:
            return xp.astype(a1[:, :, None] == a2[:, None, :], dtype)
        return xp.matmul(a1, xp.permute_dims(a2, (0, 2, 1)))
    n1, s1 = a1.shape[:2]
    n2, s2 = a2.shape[:2]
    if equal:
        same = xp.reshape(a1, (n1, 1, s1, 1)) == xp.reshape(a2, (1, n2, 1, s2))
        return xp.astype(same, dtype)
    gram = xp.matmul(xp.reshape(a1, (n1 * s1, -1)), xp.permute_dims(xp.reshape(a2, (n2 * s2, -1)), (1, 0)))
    return xp.permute_dims(xp.reshape(gram, (n1, s1, n2, s2)), (0, 2, 1, 3))


def ones(xp: Any, a1: Any, a2: Any, axes: KernelAxes, like: Any) -> Any:
    """Unit weights for every token pair (a bias alone), shaped as :func:`pair_weights`."""
    shape = (a1.shape[0], a1.shape[1], a2.shape[1])
    if 0 not in axes.diagonal:
        shape = (a1.shape[0], a2.shape[0], a1.shape[1], a2.shape[1])
    device = device_of(like)
    return xp.ones(shape, dtype=like.dtype, **({} if device is None else {"device": device}))
