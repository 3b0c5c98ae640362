"""Low-rank factorization of a model's dense layers, W ≈ U·V (arXiv 2210.04807).

The rank choice and the factors are computed here, once for every framework, in float64 numpy
on the host (weights are small next to the kernels); the adapters only find the dense layers
(each weight given as an (in, out) matrix) and build the copy with ntkcore's factorized layer
in their place. Structured derivatives see a factorized layer as two chained dense pieces, so
its NTK costs scale with the rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .registry import detect_backend, get_backend

TRAINABLE = ("both", "u")


@dataclass(frozen=True)
class Factors:
    """One layer's factors, W ≈ u @ v with u (in, rank) and v (rank, out); ``train_v`` False
    keeps v a fixed (non-trainable) random projection."""

    u: np.ndarray
    v: np.ndarray
    train_v: bool = True

    @property
    def rank(self) -> int:
        return self.u.shape[1]


def energy_rank(singular_values: Any, energy: float) -> int:
    """The smallest rank whose singular values keep a fraction ``energy`` of Σ σ²."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    total = s2.sum()
    if total == 0:
        return 1
    kept = np.cumsum(s2) / total
    # a relative tolerance, so that energy=1 means "all of it" and not "more than rounding allows"
    return int(min(np.searchsorted(kept, energy - 1e-12 * max(energy, 1.0)) + 1, len(s2)))


def svd_factors(weight: np.ndarray, rank: int) -> Factors:
    """Truncated SVD W ≈ (P_r·√Σ_r)(√Σ_r·Q_rᵀ): the best rank-``rank`` approximation (Eckart–
    Young), split evenly so that both factors have the same scale."""
    p, s, qt = np.linalg.svd(weight, full_matrices=False)
    root = np.sqrt(s[:rank])
    return Factors(p[:, :rank] * root, root[:, None] * qt[:rank])


def projection_factors(weight: np.ndarray, rank: int, rng: np.random.Generator) -> Factors:
    """V a fixed random projection, U = W·V⁺ the least-squares best given V (so U·V = W·P, P the
    projection onto V's row space). V's rows are orthonormal, scaled by √(out/rank): then
    E[VᵀV] = I, so the layer's NTK term (x1·x2)(g1·VᵀV·g2ᵀ) is the original's in expectation,
    and exactly the original's (as are the outputs) at rank = out, where V is orthogonal."""
    out = weight.shape[1]
    q = np.linalg.qr(rng.normal(size=(out, rank)))[0].T  # (rank, out), orthonormal rows
    v = q * np.sqrt(out / rank)
    return Factors(weight @ q.T * np.sqrt(rank / out), v, train_v=False)


def max_rank(shape: tuple[int, int], trainable: str) -> int:
    """The largest rank: min(in, out) for trained U and V; out with V fixed (W·P is exact at
    rank = out, whatever the input width)."""
    return shape[1] if trainable == "u" else min(shape)


def _ranks(weights: Mapping[str, np.ndarray], rank: Any, energy: Any, trainable: str) -> dict:
    shapes = {name: w.shape for name, w in weights.items()}
    if (rank is None) == (energy is None):
        raise ValueError("factorize needs exactly one of rank= (an int, or layer name -> int) or energy= (0 < e <= 1)")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise ValueError(f"energy= must be a fraction of the squared singular values in (0, 1], got {energy!r}")
        return {name: energy_rank(np.linalg.svd(w, compute_uv=False), float(energy)) for name, w in weights.items()}
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(shapes))
        if unknown:
            raise ValueError(f"rank= names {unknown}, which are not among the chosen dense layers {list(shapes)}")
        ranks = {name: rank.get(name) for name in shapes}
        missing = [name for name, r in ranks.items() if r is None]
        if missing:
            raise ValueError(f"rank= gives no rank for the chosen layers {missing}; name them all, or pass layers=")
    else:
        ranks = dict.fromkeys(shapes, rank)
    for name, r in ranks.items():
        most = max_rank(shapes[name], trainable)
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= most:
            raise ValueError(
                f"rank={r!r} for layer {name!r} ({shapes[name][0]} -> {shapes[name][1]}) must be an integer "
                f"in 1..{most}"
            )
    return {name: int(r) for name, r in ranks.items()}


def factorize(
    model: Any,
    rank: int | Mapping[str, int] | None = None,
    *,
    energy: float | None = None,
    layers: Iterable[str] | None = None,
    trainable: str = "both",
    params: Any = None,
    seed: int = 0,
    backend: str | None = None,
) -> Any:
    """A copy of ``model`` with dense layers replaced by ntkcore's factorized layer W = U·V.

    ``model``: a torch ``nn.Module``, a Keras Sequential or functional model, or a JAX function
    ``apply(params, x)`` with its parameter pytree as ``params=``. ``rank``: one rank for every
    chosen layer, or ``{layer: rank}``; ``energy``: instead, per layer the smallest rank keeping
    that fraction of the squared singular values. ``layers``: names of dense layers (torch module
    paths, Keras layer names, JAX leaf paths such as ``"w1"`` or ``"params.Dense_0.kernel"``);
    default: every dense layer with a trainable weight (with one integer ``rank``, those wider than
    it on both sides; in JAX every 2-D leaf).

    ``trainable="both"`` trains U and V, initialised by truncated SVD (the best rank-r W). At full
    rank, min(in, out), the copy computes the same function; its NTK is that of the new
    parameters, per layer Θ_l = (x1·U·Uᵀ·x2)(g1·g2) + (x1·x2)(g1·VᵀV·g2ᵀ) instead of
    (x1·x2)(g1·g2). ``trainable="u"`` makes V a fixed random projection (seeded by ``seed``) and
    U = W·V⁺, so only U is trained, as in the dimensionality-reduction setting: the NTK is the
    original's in expectation over V, and exactly, with the same function, at rank = out. The
    original model is left unchanged.

    Returns the new model (torch, Keras) or ``(apply, params)`` (JAX), in the original dtype and
    on the original device.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable= must be one of {TRAINABLE}, got {trainable!r}")
    adapter = get_backend(backend) if backend is not None else detect_backend(model, params, ())
    dense = getattr(adapter, "dense_layers", None)
    if dense is None:
        raise NotImplementedError(f"the {adapter.name} backend cannot factorize models")
    found = dense(model, params)  # name -> (in, out) float64 weight, trainable ones first-class
    if layers is None:  # trainable weights; with one int rank, those it would reduce
        chosen = [name for name, (_, is_trainable) in found.items() if is_trainable]
        if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
            chosen = [name for name in chosen if rank < max_rank(found[name][0].shape, trainable)]
        if not chosen:
            sizes = {name: found[name][0].shape for name in found}
            raise ValueError(
                f"model has no trainable dense layer to factorize at rank={rank!r}; its dense layers: {sizes}"
            )
    else:
        chosen = [layers] if isinstance(layers, str) else list(layers)
        unknown = [name for name in chosen if name not in found]
        if unknown or not chosen:
            raise ValueError(
                f"layers= {unknown or chosen} are not dense layers of the model; its dense layers: {list(found)}"
            )
    weights = {name: found[name][0] for name in chosen}
    ranks = _ranks(weights, rank, energy, trainable)
    rng = np.random.default_rng(seed)
    factors = {
        name: svd_factors(w, ranks[name]) if trainable == "both" else projection_factors(w, ranks[name], rng)
        for name, w in weights.items()
    }
    return adapter.factorized(model, params, factors)
