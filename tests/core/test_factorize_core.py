"""The framework-free part of ``ntkcore.factorize``: rank by energy and the two initialisations."""

from __future__ import annotations

import numpy as np
import pytest

from ntkcore.factorize import energy_rank, max_rank, projection_factors, svd_factors


@pytest.mark.parametrize(
    ("energy", "rank"), [(0.1, 1), (16 / 30, 1), (0.54, 2), (25 / 30, 2), (0.9, 3), (29 / 30, 3), (0.99, 4), (1.0, 4)]
)
def test_energy_rank_of_known_singular_values(energy: float, rank: int) -> None:
    # σ = 4, 3, 2, 1, 0 (any order): σ² sums to 30, cumulative 16, 25, 29, 30, 30
    assert energy_rank([2.0, 4.0, 0.0, 1.0, 3.0], energy) == rank


def test_svd_factors_are_the_best_approximation() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(9, 6))
    s = np.linalg.svd(w, compute_uv=False)
    for r in range(1, 7):
        f = svd_factors(w, r)
        assert f.u.shape == (9, r) and f.v.shape == (r, 6) and f.train_v
        # Eckart–Young: the Frobenius error is the norm of the dropped singular values
        assert np.linalg.norm(w - f.u @ f.v) == pytest.approx(np.sqrt((s[r:] ** 2).sum()), abs=1e-12)
        assert np.allclose(f.u.T @ f.u, f.v @ f.v.T)  # balanced: both factors carry √Σ


def test_projection_factors() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 7))  # in 4 < out 7: with V fixed the rank may reach 7
    assert max_rank(w.shape, "u") == 7 and max_rank(w.shape, "both") == 4
    full = projection_factors(w, 7, np.random.default_rng(2))
    assert not full.train_v and np.allclose(full.u @ full.v, w) and np.allclose(full.v.T @ full.v, np.eye(7))
    f = projection_factors(w, 3, np.random.default_rng(2))
    assert np.allclose(f.v @ f.v.T, 7 / 3 * np.eye(3))  # orthonormal rows scaled by √(out/rank)
    # U·V = W·P, P the orthogonal projection onto V's row space
    p = f.v.T @ np.linalg.pinv(f.v.T)
    assert np.allclose(f.u @ f.v, w @ p)
    # E[VᵀV] = I: the mean over many projections
    draws = (projection_factors(w, 3, np.random.default_rng(s)) for s in range(4000))
    mean = np.mean([g.v.T @ g.v for g in draws], axis=0)
    assert np.abs(mean - np.eye(7)).max() < 0.1
