"""``implementation="sketch"``: the projected-Jacobian estimate (ntkcore/implementations/sketch.py)
on every backend, against the exact kernel of the zoo's ``mlp`` (float64).

The estimate is random, so every bound below is statistical, with its margin stated: with the
seeds fixed the outcomes are fixed too (no flakiness), and each bound holds with wide room at
other seeds (the measured figures are in the comments).
"""

from __future__ import annotations

import numpy as np
import pytest

import ntkcore
from ntkcore.implementations import REGISTRY
from tests.models.spec import inputs

CASE = "mlp"
# the plain sketch (dense sign columns through jvps) and the Kronecker-structured one (per layer,
# from the capture) on the MLP, and on the transformer (embedding table tied to the readout)
KINDS = {
    "dense": ("mlp", {}),
    "kronecker": ("mlp", {"sketch_kronecker": True}),
    "kronecker-transformer": ("transformer", {"sketch_kronecker": True}),
}


def _setup(zoo, case: str = CASE):
    built = zoo.build(case, "float64")
    x1, x2 = inputs(case)
    x1, x2 = zoo.to_native(x1, "float64"), zoo.to_native(x2, "float64")
    exact = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **built.kwargs))
    return built, x1, x2, exact


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", list(KINDS))
def test_unbiased(backend, zoo, kind):
    """The mean of 64 independent sketches of k = 8 is 8× closer to the kernel than one is (the
    error of a mean of S unbiased estimates falls as 1/√S); a biased estimate would stall.
    Bound: 3× the predicted error of the mean (measured 0.7–1.2×)."""
    case, options = KINDS[kind]
    built, x1, x2, exact = _setup(zoo, case)
    sketches = [
        zoo.to_numpy(
            ntkcore.ntk(built.model, x1, x2, implementation="sketch", sketch_dim=8, seed=s, **options, **built.kwargs)
        )
        for s in range(64)
    ]
    single = np.sqrt(np.mean([_relative(k, exact) ** 2 for k in sketches]))
    assert _relative(np.mean(sketches, axis=0), exact) < 3 * single / np.sqrt(64)


def test_error_falls_as_one_over_root_k(backend, zoo):
    """From k = 32 to k = 2048 (64×) the error falls 8× in expectation; bound: at least 4×,
    averaged over 4 seeds (measured 6–10×)."""
    built, x1, x2, exact = _setup(zoo)

    def error(k: int) -> float:
        runs = [
            ntkcore.ntk(built.model, x1, x2, implementation="sketch", sketch_dim=k, seed=s, **built.kwargs)
            for s in range(4)
        ]
        return float(np.mean([_relative(zoo.to_numpy(r), exact) for r in runs]))

    assert error(2048) < error(32) / 4


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_error_estimate_covers_the_error(backend, zoo, kind):
    """The blocks' standard error: its norm within 2× of the actual error's (measured 0.75–1.3×),
    and the kernel within ±3 standard errors for at least 85% of the entries (a t-distribution
    with 7 degrees of freedom puts 98% there)."""
    case, options = KINDS[kind]
    built, x1, x2, exact = _setup(zoo, case)
    result = ntkcore.sketched_ntk(built.model, x1, x2, sketch_dim=512, seed=7, **options, **built.kwargs)
    assert zoo.is_native(result.kernel, "float64") and zoo.is_native(result.standard_error, "float64")
    estimate, error = zoo.to_numpy(result.kernel), zoo.to_numpy(result.standard_error)
    assert estimate.shape == error.shape == exact.shape
    assert 0.5 < np.linalg.norm(error) / np.linalg.norm(estimate - exact) < 2
    assert np.mean(np.abs(estimate - exact) <= 3 * error) >= 0.85
    again = ntkcore.ntk(built.model, x1, x2, implementation="sketch", sketch_dim=512, seed=7, **options, **built.kwargs)
    np.testing.assert_allclose(zoo.to_numpy(again), estimate, rtol=1e-12, atol=1e-12 * np.abs(estimate).max())


def test_one_sketch_across_tiles_stores_and_axes(backend, zoo, tmp_path):
    """The same seed is the same R: a tiled or stored sketch equals the whole one, a traced one its
    trace; a store of another seed is not taken for it."""
    built, x1, x2, _ = _setup(zoo)
    options = {"implementation": "sketch", "sketch_dim": 64, "seed": 3, **built.kwargs}
    whole = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **options))
    tiled = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, batch_size=2, **options))
    np.testing.assert_allclose(tiled, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    stored = np.asarray(ntkcore.ntk(built.model, x1, x2, batch_size=2, out=str(tmp_path / "k.npy"), **options))
    np.testing.assert_allclose(stored, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    with pytest.raises(ntkcore.StoreMismatchError):
        ntkcore.ntk(built.model, x1, x2, batch_size=2, out=str(tmp_path / "k.npy"), **{**options, "seed": 5})
    traced = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, trace_axes=(-1,), **options))
    np.testing.assert_allclose(traced, np.trace(whole, axis1=2, axis2=3), rtol=1e-12, atol=1e-12)
    other = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, **{**options, "seed": 4}))
    assert not np.allclose(other, whole)


def test_never_auto_and_options_checked(backend, zoo):
    built, x1, _, _ = _setup(zoo)
    assert "sketch" not in REGISTRY
    assert "sketch" not in ntkcore.explain(built.model, x1, **built.kwargs).estimates
    with pytest.raises(ValueError, match=r'implementation="sketch" needs sketch_dim='):
        ntkcore.ntk(built.model, x1, implementation="sketch", **built.kwargs)
    with pytest.raises(ValueError, match=r"sketch_dim= and seed= set the sketch"):
        ntkcore.ntk(built.model, x1, sketch_dim=16, **built.kwargs)
    with pytest.raises(ValueError, match=r"sketch_dim must be an int >= 1, got 0"):
        ntkcore.ntk(built.model, x1, implementation="sketch", sketch_dim=0, **built.kwargs)
    with pytest.raises(ValueError, match=r"per_layer=True takes an exact implementation"):
        ntkcore.ntk(built.model, x1, implementation="sketch", sketch_dim=16, per_layer=True, **built.kwargs)
    with pytest.raises(ValueError, match=r"with batch_independent=False use the plain sketch"):
        ntkcore.ntk(
            built.model, x1, implementation="sketch", sketch_dim=16, sketch_kronecker=True,
            batch_independent=False, **built.kwargs,
        )  # fmt: skip


@pytest.mark.parametrize("columns", ["kronecker", "plain"])
def test_kronecker_sketch_on_convolutions(backend, zoo, monkeypatch, columns):
    """Every convolution of the structured ``convs`` case (strided, dilated, padded, grouped,
    depthwise, 1D, 3D) with its weight's columns forced Kronecker-structured (s⊗r, from patches
    that torch and TensorFlow form on request) or plain: unbiased, as :func:`test_unbiased`
    states it (same bound), and the columns are the ones forced."""
    if "structured" not in zoo.CAPABILITIES or "convs" not in zoo.STRUCTURED_CASES:
        pytest.skip(f"{backend} has no 'convs' structured case")
    from ntkcore.rules import conv

    monkeypatch.setattr(conv, "kronecker_pays", lambda *sizes: columns == "kronecker")
    seen, project = [], type(conv.RULE).project

    def recorded(self, xp, x, g, shapes, signs):
        seen.append(len(signs["weight"]))  # 2 factors: s⊗r; 1: plain signs on the gradient
        return project(self, xp, x, g, shapes, signs)

    monkeypatch.setattr(type(conv.RULE), "project", recorded)
    built, x1, x2, _ = zoo.structured_case("convs")
    exact = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, implementation="jacobian_contraction", **built.kwargs))
    options = {"implementation": "sketch", "sketch_dim": 8, "sketch_kronecker": True, **built.kwargs}
    sketches = [zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, seed=s, **options)) for s in range(64)]
    single = np.sqrt(np.mean([_relative(k, exact) ** 2 for k in sketches]))
    assert _relative(np.mean(sketches, axis=0), exact) < 3 * single / np.sqrt(64)
    if columns == "kronecker":
        assert set(seen) == {2}
    else:  # torch and TensorFlow keep their framework's gradients; JAX's conv rule projects them
        assert set(seen) <= {1} and (backend != "jax" or seen)
