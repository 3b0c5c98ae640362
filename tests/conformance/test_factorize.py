"""``ntkcore.factorize`` on every backend: the copy's outputs, kernel, shapes and errors.

float64 throughout, so equalities that are exact in exact arithmetic hold to 1e-9 relative
(an SVD and a few hundred products; rounding is near 1e-14).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import ntkcore
from ntkcore.factorize import svd_factors
from tests.models import Built
from tests.models.spec import inputs

DTYPE = "float64"
EXACT = 1e-9


def _close(actual, expected, rtol: float = EXACT) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert float(np.abs(actual - expected).max()) <= rtol * max(float(np.abs(expected).max()), 1e-300)


def _factorize(built: Built, *args, **options) -> Built:
    out = ntkcore.factorize(built.model, *args, params=built.kwargs.get("params"), **options)
    if isinstance(out, tuple):  # JAX: (apply, params)
        return Built(out[0], {"params": out[1]})
    return Built(out, {})


def _kernel(zoo, built: Built, x: np.ndarray, **options):
    return zoo.to_numpy(ntkcore.ntk(built.model, zoo.to_native(x, DTYPE), **built.kwargs, **options))


def _dense(backend: str, built: Built) -> dict:
    return ntkcore.get_backend(backend).dense_layers(built.model, built.kwargs.get("params"))


def _trainable(backend: str, built: Built) -> dict[str, tuple]:
    prepared = ntkcore.get_backend(backend).prepare(built.model, built.kwargs.get("params"))
    return {name: tuple(p.shape) for name, p in prepared.params.items()}


def test_fixed_v_at_full_rank_reproduces_outputs_and_kernel(backend, zoo):
    built = zoo.build("mlp", DTYPE)
    x = inputs("mlp")[0]
    ranks = {name: w.shape[1] for name, (w, _) in _dense(backend, built).items()}  # rank = out
    assert len(ranks) == 4
    new = _factorize(built, ranks, trainable="u")
    _close(zoo.to_numpy(zoo.forward(new, x)), zoo.to_numpy(zoo.forward(built, x)))
    _close(_kernel(zoo, new, x), _kernel(zoo, built, x))
    # V is fixed: U and the biases are trained, U is (in, out) for every layer
    widths = [(6, 8), (8, 8), (8, 8), (8, 3)]
    assert sorted(_trainable(backend, new).values()) == sorted(
        [*(s for a, b in widths for s in ((b, a) if backend == "torch" else (a, b), (b,)))]
    )


def test_svd_at_full_rank_reproduces_outputs_and_the_factored_kernel(backend, zoo):
    """f(x) = x·W + b; with both factors trained Θ = [(x1·U·Uᵀ·x2) + 1]·I + (x1·x2)·VᵀV."""
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(6, 4)), rng.normal(size=4)
    built = zoo.linear(w, b)
    x = rng.normal(size=(5, 6))
    layer = list(_dense(backend, built))
    new = _factorize(built, 4, layers=layer)  # by default a layer is not factorized at full rank
    _close(zoo.to_numpy(zoo.forward(new, x)), x @ w + b)
    f = svd_factors(w, 4)
    expected = np.einsum("ij,ab->iajb", x @ f.u @ f.u.T @ x.T + 1, np.eye(4))
    expected += np.einsum("ij,ab->iajb", x @ x.T, f.v.T @ f.v)
    _close(_kernel(zoo, new, x), expected.transpose(0, 2, 1, 3))
    # and it is not the original's: a change of parameters changes the kernel
    assert np.abs(_kernel(zoo, built, x) - expected.transpose(0, 2, 1, 3)).max() > 1e-3
    # below full rank: the best rank-2 approximation, x·W_2 + b
    f = svd_factors(w, 2)
    _close(zoo.to_numpy(zoo.forward(_factorize(built, 2), x)), x @ f.u @ f.v + b)
    p, sv, qt = np.linalg.svd(w)
    _close(f.u @ f.v, (p[:, :2] * sv[:2]) @ qt[:2])


def test_rank_r_shapes_counts_and_structure(backend, zoo):
    built = zoo.build("mlp", DTYPE)
    x = inputs("mlp")[0]
    dense = _dense(backend, built)
    new = _factorize(built, 2)  # every layer wider than 2 on both sides: all four
    shapes = _trainable(backend, new)
    expected = sum(w.shape[0] * 2 + 2 * w.shape[1] + w.shape[1] for w, _ in dense.values())
    assert sum(math.prod(s) for s in shapes.values()) == expected
    assert len(shapes) == 3 * len(dense)  # U, V, bias per layer
    # structured derivatives treat each factor as a dense layer: no fallback, same kernel as JC
    with warnings.catch_warnings():
        warnings.simplefilter("error", ntkcore.StructuredFallbackWarning)
        structured = _kernel(zoo, new, x, implementation="structured")
    _close(structured, _kernel(zoo, new, x, implementation="jacobian_contraction"))


def test_default_layers_skip_frozen_and_too_narrow_ones(backend, zoo):
    built = zoo.build("batchnorm_frozen", DTYPE)  # l2 is frozen; l3 is 8 -> 3
    before = _trainable(backend, built)
    new = _factorize(built, 4)
    after = _trainable(backend, new)
    frozen = [name for name, (_, trainable) in _dense(backend, built).items() if not trainable]
    if backend != "jax":  # JAX keeps frozen weights out of params: factorize never sees them
        assert len(frozen) == 1  # l2, still a plain dense layer, still frozen
        assert frozen[0] in _dense(backend, new) and not _dense(backend, new)[frozen[0]][1]
    # l1 (6 -> 8) is factorized at rank 4; l3 (8 -> 3) is narrower than the rank and kept
    assert sum(map(math.prod, after.values())) == sum(map(math.prod, before.values())) - 6 * 8 + (6 * 4 + 4 * 8)


def test_energy_picks_the_rank_of_known_singular_values(backend, zoo):
    rng = np.random.default_rng(4)
    p, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    s = np.array([4.0, 3.0, 2.0, 1.0, 0.0])  # σ² = 16, 9, 4, 1, 0: cumulative 0.53, 0.83, 0.97, 1
    built = zoo.linear((p[:, :5] * s) @ q.T, np.zeros(5))
    x = rng.normal(size=(3, 7))
    for energy, rank in ((0.5, 1), (0.8, 2), (0.9, 3), (0.97, 4), (1.0, 4)):
        new = _factorize(built, energy=energy)
        assert sum(map(math.prod, _trainable(backend, new).values())) == 7 * rank + rank * 5 + 5, energy
    _close(zoo.to_numpy(zoo.forward(_factorize(built, energy=1.0), x)), zoo.to_numpy(zoo.forward(built, x)))


def test_original_model_is_unchanged(backend, zoo):
    built = zoo.build("mlp", DTYPE)
    x = inputs("mlp")[0]
    before = zoo.to_numpy(zoo.forward(built, x))
    names = _trainable(backend, built)
    _factorize(built, 2)
    _close(zoo.to_numpy(zoo.forward(built, x)), before, rtol=0)
    assert _trainable(backend, built) == names


def test_bad_ranks_layers_and_options_are_refused(backend, zoo):
    built = zoo.build("mlp", DTYPE)
    names = list(_dense(backend, built))
    first, last = names[0], names[-1]
    cases = [
        ({"rank": 0, "layers": [first]}, "rank=0 for layer"),
        ({"rank": 7, "layers": [first]}, r"must be an integer in 1\.\.6"),
        ({"rank": 2.5, "layers": [first]}, "rank=2.5"),
        ({"rank": True, "layers": [first]}, "rank=True"),
        ({"rank": 4, "layers": [last]}, r"in 1\.\.3"),
        ({"rank": {first: 2, "nope": 2}}, r"rank= names \['nope'\]"),
        ({"rank": {first: 2}, "layers": [first, last]}, "gives no rank for the chosen layers"),
        ({"rank": 2, "layers": ["nope"]}, r"layers= \['nope'\] are not dense layers"),
        ({"rank": 2, "energy": 0.9}, "exactly one of rank="),
        ({}, "exactly one of rank="),
        ({"energy": 0.0}, r"energy= must be .* in \(0, 1\]"),
        ({"energy": 1.5}, r"energy= must be .* in \(0, 1\]"),
        ({"rank": 2, "trainable": "v"}, r"trainable= must be one of \('both', 'u'\)"),
        ({"rank": 9}, "no trainable dense layer to factorize at rank=9"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            _factorize(built, **options)
    # with V fixed the rank may reach the output width, beyond the input width
    wide = {first: 8}
    assert _factorize(built, wide, layers=[first], trainable="u") is not None
    with pytest.raises(ValueError, match=r"in 1\.\.8"):
        _factorize(built, {first: 9}, layers=[first], trainable="u")
