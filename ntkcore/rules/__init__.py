"""Structure rules, written once in array-API terms and keyed by layer kind.

Every rule receives, for both batches, a layer's structured input and its output cotangents
``g`` of shape (N, *out, S, F) — one per output component of f, per token position s, per
feature — and returns the layer's contribution to the kernel in the order of
``axes.final_labels()``, without forming ∂y/∂θ:

- dense y_s = x_s·W + b: Θ = Σ_{s,t} (x1_s·x2_t + 1[bias]) (g1_s·g2_t), or, when token axes
  make the pairwise form dearer, the per-example gradients Σ_s g_sᵀx_s contracted;
- convolution: a dense layer on each output position's input patch, per group (grouped and
  depthwise included); per-example weight gradients contracted (adapters whose framework
  differentiates convolutions faster take those gradients from it instead, see
  ``Capture.framework_gradients``);
- affine y = x̂∘γ + β (LayerNorm, RMSNorm, GroupNorm, BatchNorm): per-example gradients
  Σ_s g_s∘x̂_s and Σ_s g_s contracted (cost linear in the width);
- embedding y_s = E[id_s]: Θ = Σ_{s,t} [id1_s = id2_t] (g1_s·g2_t).

A weight used in several calls (a layer applied twice) arrives with the calls' token axes
concatenated, which makes the cross terms exact. ``GRADIENTS`` gives each kind's per-example
gradients in the parameter's layout, for a parameter shared by layers of different kinds.
"""

from __future__ import annotations

import math
from typing import Any

from ..algorithms._common import device_of
from ..algorithms.jacobian_contraction import contract
from ..axes import KernelAxes, Label, permute_to


def _batch_labels(axes: KernelAxes) -> list[Label]:
    return [("d", 0)] if 0 in axes.diagonal else [(1, 0), (2, 0)]


def output_pairs(axes: KernelAxes, out_shape: tuple[int, ...]) -> int:
    """Output pairs contracted per example pair: O_a² for kept axes, O_a for reduced ones."""
    return math.prod(n if (a in axes.trace or a in axes.diagonal) else n * n for a, n in enumerate(out_shape, start=1))


def pair_entries(axes: KernelAxes, out_shape: tuple[int, ...]) -> int:
    """Kernel entries per example pair: O_a² for kept axes, O_a for diagonal ones, 1 traced."""
    return math.prod(n * n if a in axes.kept else n if a in axes.diagonal else 1 for a, n in enumerate(out_shape, 1))


def _token_products(xp: Any, g1: Any, g2: Any, axes: KernelAxes) -> tuple[Any, list[Label]]:
    """(g1_s·g2_t) for every kept output pair, with the token axis (index ``axes.ndim``, after
    f's output axes) kept on both sides; returns the array and its labels."""
    ext = KernelAxes(axes.ndim + 1, axes.trace, axes.diagonal)
    product = contract(xp, {"g": g1}, {"g": g2}, ext, tuple(g1.shape[:-1]), tuple(g2.shape[:-1]))
    return product, ext.final_labels()


def _pairwise(xp: Any, g1: Any, g2: Any, weights: Any, axes: KernelAxes) -> Any:
    """Σ_{s,t} weights[.., s, t] · (g1_s·g2_t), with ``weights`` labelled batch + (1,S), (2,S)."""
    product, labels = _token_products(xp, g1, g2, axes)
    token = axes.ndim
    head = [*_batch_labels(axes), (1, token), (2, token)]
    rest = [label for label in labels if label not in head]
    product = permute_to(xp, product, labels, head + rest)
    weights = xp.reshape(weights, (*weights.shape, *([1] * len(rest))))
    n_batch = len(_batch_labels(axes))
    total = xp.sum(product * weights, axis=(n_batch, n_batch + 1))
    return permute_to(xp, total, [*_batch_labels(axes), *rest], axes.final_labels())


def _pair_weights(xp: Any, a1: Any, a2: Any, axes: KernelAxes, *, equal: bool, dtype: Any) -> Any:
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


def _per_example(xp: Any, jac1: dict, jac2: dict, axes: KernelAxes) -> Any:
    """Contract per-example gradients ``name -> (N, *out, P)``."""
    first = next(iter(jac1.values()))
    second = jac2[next(iter(jac1))]
    return contract(xp, jac1, jac2, axes, tuple(first.shape[: axes.ndim]), tuple(second.shape[: axes.ndim]))


_MEMORY = 16  # multiply-adds per element written to and read back from memory (2-core CPUs)


def dense_orders(
    n1: int, n2: int, s: int, n_in: int, f: int, out_shape: tuple[int, ...], axes: KernelAxes
) -> dict[str, tuple[float, float, float]]:
    """The dense rule's two contraction orders: ``order -> (score, FLOPs, intermediate elements)``.

    The rule takes the order of lower score, and :mod:`ntkcore.cost_model` predicts with the
    same figures. The score counts multiply-adds plus ``_MEMORY`` for every element of the
    intermediate an order materialises (token products, per-example gradients): batched
    matmuls over a short token axis are memory-bound, so multiply-adds alone pick the slower
    order. FLOPs are 2 × multiply-adds.
    """
    examples = n1 if 0 in axes.diagonal else n1 * n2
    pairs = examples * output_pairs(axes, out_shape)
    entries = examples * pair_entries(axes, out_shape)  # kernel entries per pair of tokens
    pairwise = pairs * s * s * f + examples * s * s * n_in
    gradients = (n1 + n2) * math.prod(out_shape) * f * n_in
    per_example = gradients * s + pairs * f * n_in
    return {
        "pairwise": (pairwise + _MEMORY * entries * s * s, 2.0 * pairwise, float(entries * s * s)),
        "per_example": (per_example + _MEMORY * gradients, 2.0 * per_example, float(gradients)),
    }


def dense(
    xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str], order: str | None = None
) -> Any:
    """y_s = x_s·W (+ b). ``x`` (N, S, in), ``g`` (N, *out, S, F); ``roles`` ⊆ {weight, bias}.

    ``order`` forces ``"pairwise"`` or ``"per_example"``; by default the one
    :func:`dense_orders` scores lower is taken.
    """
    costs = dense_orders(x1.shape[0], x2.shape[0], x1.shape[1], x1.shape[2], g1.shape[-1], tuple(g1.shape[1:-2]), axes)
    if order == "pairwise" or (order is None and costs["pairwise"][0] <= costs["per_example"][0]):
        weights = 0
        if "weight" in roles:
            weights = _pair_weights(xp, x1, x2, axes, equal=False, dtype=g1.dtype)
        if "bias" in roles:
            weights = weights + 1 if "weight" in roles else _ones(xp, _pair_shape(x1, x2, axes), g1)
        return _pairwise(xp, g1, g2, weights, axes)
    return _per_example(xp, dense_gradients(xp, x1, g1, roles), dense_gradients(xp, x2, g2, roles), axes)


def dense_gradients(xp: Any, x: Any, g: Any, roles: set[str], shapes: Any = None) -> dict[str, Any]:
    """Per-example gradients of y_s = x_s·W (+ b): weight (N, *out, F·in) as Σ_s g_sᵀx_s (W laid
    out (out, in)), bias (N, *out, F)."""
    s, n_in, f = x.shape[1], x.shape[2], g.shape[-1]
    lead = tuple(g.shape[:-2])
    jac = {}
    if "weight" in roles:  # the outputs folded into the rows of one matmul per example
        gt = xp.permute_dims(xp.reshape(g, (g.shape[0], -1, s, f)), (0, 1, 3, 2))  # (N, O, F, S)
        grad = xp.matmul(xp.reshape(gt, (g.shape[0], -1, s)), x)  # (N, O·F, in)
        jac["weight"] = xp.reshape(grad, (*lead, f * n_in))
    if "bias" in roles:
        jac["bias"] = xp.sum(g, axis=-2)
    return jac


def _ones(xp: Any, shape: tuple[int, ...], like: Any) -> Any:
    device = device_of(like)
    return xp.ones(shape, dtype=like.dtype, **({} if device is None else {"device": device}))


def _pair_shape(a1: Any, a2: Any, axes: KernelAxes) -> tuple[int, ...]:
    if 0 in axes.diagonal:
        return (a1.shape[0], a1.shape[1], a2.shape[1])
    return (a1.shape[0], a2.shape[0], a1.shape[1], a2.shape[1])


def conv(xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
    """A (grouped) convolution as a dense layer on patches: ``x`` (N, S, G, K) holds each output
    position's input patch per group, ``g`` (N, *out, S, C) with C = G·F output channels, grouped
    contiguously. The per-example weight gradients Σ_s g_sᵀ·patch_s are contracted (the
    pairwise form costs S² per pair, more than the few weights of a convolution).
    """
    return _per_example(xp, _conv_gradients(xp, x1, g1, roles), _conv_gradients(xp, x2, g2, roles), axes)


def _conv_gradients(xp: Any, x: Any, g: Any, roles: set[str]) -> dict[str, Any]:
    """Per-example gradients of a (grouped) convolution from its patches: weight (N, *out, G·F·K),
    bias (N, *out, C)."""
    n, s, groups, k = x.shape
    lead = tuple(g.shape[:-2])
    jac = {}
    if "weight" in roles:  # one matmul per example and group, the outputs folded into the rows
        f = g.shape[-1] // groups
        gg = xp.reshape(g, (n, -1, s, groups, f))  # (N, O, S, G, F)
        gg = xp.reshape(xp.permute_dims(gg, (0, 3, 1, 4, 2)), (n, groups, -1, s))  # (N, G, O·F, S)
        grad = xp.matmul(gg, xp.permute_dims(x, (0, 2, 1, 3)))  # (N, G, O·F, K)
        grad = xp.permute_dims(xp.reshape(grad, (n, groups, -1, f, k)), (0, 2, 1, 3, 4))  # (N, O, G, F, K)
        jac["weight"] = xp.reshape(grad, (*lead, -1))
    if "bias" in roles:
        jac["bias"] = xp.sum(g, axis=-2)
    return jac


def affine(xp: Any, x1: Any, g1: Any, x2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
    """y = x̂∘γ + β over the feature axis. ``x`` (N, S, F) is x̂; ``roles`` ⊆ {scale, shift}."""
    return _per_example(xp, affine_gradients(xp, x1, g1, roles), affine_gradients(xp, x2, g2, roles), axes)


def affine_gradients(xp: Any, x: Any, g: Any, roles: set[str], shapes: Any = None) -> dict[str, Any]:
    """Per-example gradients Σ_s g_s∘x̂_s (scale) and Σ_s g_s (shift): (N, *out, F)."""
    jac = {}
    if "scale" in roles:
        xb = xp.reshape(x, (x.shape[0], *([1] * (len(g.shape) - 3)), *x.shape[1:]))
        jac["scale"] = xp.sum(g * xb, axis=-2)
    if "shift" in roles:
        jac["shift"] = xp.sum(g, axis=-2)
    return jac


def embedding(xp: Any, ids1: Any, g1: Any, ids2: Any, g2: Any, axes: KernelAxes, roles: set[str]) -> Any:
    """y_s = E[id_s]. ``ids`` (N, S) integers, ``g`` (N, *out, S, F)."""
    return _pairwise(xp, g1, g2, _pair_weights(xp, ids1, ids2, axes, equal=True, dtype=g1.dtype), axes)


def embedding_gradients(xp: Any, ids: Any, g: Any, roles: set[str], shapes: dict[str, tuple]) -> dict[str, Any]:
    """Per-example gradient Σ_s onehot(id_s) ⊗ g_s of the table, laid out (vocabulary, F):
    (N, *out, V·F). ``shapes`` gives the table's shape."""
    n, s = ids.shape
    vocabulary, f = shapes["table"]
    lead = tuple(g.shape[:-2])
    device = device_of(ids)
    rows_ids = xp.arange(vocabulary, dtype=ids.dtype, **({} if device is None else {"device": device}))
    onehot = xp.astype(xp.reshape(ids, (n, s, 1)) == xp.reshape(rows_ids, (1, 1, -1)), g.dtype)  # (N, S, V)
    rows = xp.reshape(xp.permute_dims(xp.reshape(g, (n, -1, s, f)), (0, 2, 1, 3)), (n, s, -1))  # (N, S, O·F)
    grad = xp.matmul(xp.permute_dims(onehot, (0, 2, 1)), rows)  # (N, V, O·F)
    grad = xp.permute_dims(xp.reshape(grad, (n, vocabulary, -1, f)), (0, 2, 1, 3))  # (N, O, V, F)
    return {"table": xp.reshape(grad, (*lead, vocabulary * f))}


RULES = {"dense": dense, "conv": conv, "affine": affine, "embedding": embedding}
GRADIENTS = {
    "dense": dense_gradients,
    "affine": affine_gradients,
    "embedding": embedding_gradients,
}
