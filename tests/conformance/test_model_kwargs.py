"""``model_kwargs=``: keyword arguments of the model's calls, shared (a map) or per example (a
pair of maps for x1's and x2's examples: masks), on every entry point; the same kernel as a
model that takes the mask as a last input feature.

Tolerance: float64, 1e-12 relative to the largest entry — both models compute the same
arithmetic, only the route of the mask differs.
"""

from __future__ import annotations

import numpy as np
import pytest

import ntkcore
from ntkcore.implementations import AUTO, REGISTRY
from tests.models.spec import kwargs_inputs

RTOL = 1e-12


def _close(actual, expected) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * np.abs(expected).max())


def _reference(zoo, x1, keep1, x2=None, keep2=None, **options):
    built = zoo.kwargs_model(in_input=True)
    a1 = np.concatenate([x1, keep1[..., None].astype(x1.dtype)], axis=-1)
    a2 = None if x2 is None else np.concatenate([x2, keep2[..., None].astype(x2.dtype)], axis=-1)
    native2 = None if a2 is None else zoo.to_native(a2, "float64")
    return zoo.to_numpy(ntkcore.ntk(built.model, zoo.to_native(a1, "float64"), native2, **options, **built.kwargs))


@pytest.mark.parametrize("implementation", [*REGISTRY, AUTO])
def test_per_example_masks(backend, zoo, implementation):
    if implementation == "structured" and "structured" not in zoo.CAPABILITIES:
        pytest.skip("no per-layer capture")
    x1, keep1, x2, keep2 = kwargs_inputs()
    built = zoo.kwargs_model()
    kernel = ntkcore.ntk(
        built.model, zoo.to_native(x1, "float64"), zoo.to_native(x2, "float64"), implementation=implementation,
        model_kwargs=({"keep": keep1}, {"keep": keep2}), **built.kwargs,
    )  # fmt: skip
    assert zoo.is_native(kernel, "float64")
    _close(zoo.to_numpy(kernel), _reference(zoo, x1, keep1, x2, keep2, implementation=implementation))
    alone = ntkcore.ntk(built.model, x1, model_kwargs=({"keep": keep1}, None), trace_axes=(-1,), **built.kwargs)
    _close(zoo.to_numpy(alone), _reference(zoo, x1, keep1, trace_axes=(-1,)))


def test_masks_with_tiles_and_every_entry_point(backend, zoo):
    x1, keep1, x2, keep2 = kwargs_inputs()
    built = zoo.kwargs_model()
    pair = ({"keep": keep1}, {"keep": keep2})
    whole = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, model_kwargs=pair, **built.kwargs))
    tiled = zoo.to_numpy(ntkcore.ntk(built.model, x1, x2, batch_size=2, model_kwargs=pair, **built.kwargs))
    _close(tiled, whole)
    fn = ntkcore.ntk_fn(built.model, **built.kwargs)
    _close(zoo.to_numpy(fn(x1, x2, model_kwargs=pair)), whole)
    assert ntkcore.explain(built.model, x1, x2, model_kwargs=pair, **built.kwargs).out_shape == (3,)
    nngp = zoo.to_numpy(ntkcore.nngp(built.model, x1, x2, model_kwargs=pair, **built.kwargs))
    assert nngp.shape == whole.shape
    sketched = ntkcore.sketched_ntk(built.model, x1, x2, sketch_dim=4096, model_kwargs=pair, **built.kwargs)
    assert np.linalg.norm(zoo.to_numpy(sketched.kernel) - whole) < 0.25 * np.linalg.norm(whole)  # measured 0.07–0.08


def test_shared_arguments(backend, zoo):
    x1, _, x2, _ = kwargs_inputs()
    built = zoo.kwargs_model()
    keep = np.ones((1, 3), dtype=bool)  # broadcast over every example: shared, not per example
    base = ntkcore.ntk(built.model, x1, x2, model_kwargs={"keep": keep}, **built.kwargs)
    twice = ntkcore.ntk(built.model, x1, x2, model_kwargs={"keep": keep, "scale": 2.0}, **built.kwargs)
    _close(zoo.to_numpy(twice), 4 * zoo.to_numpy(base))


def test_bad_model_kwargs(backend, zoo):
    x1, keep1, x2, keep2 = kwargs_inputs()
    built = zoo.kwargs_model()
    with pytest.raises(ValueError, match=r"model_kwargs x2\['keep'\] has shape \(2, 3\), but its examples must match"):
        ntkcore.ntk(built.model, x1, x2, model_kwargs=({"keep": keep1}, {"keep": keep2[:2]}), **built.kwargs)
    with pytest.raises(ValueError, match=r"x1's arguments \['keep'\] and x2's \['other'\] differ"):
        ntkcore.ntk(built.model, x1, x2, model_kwargs=({"keep": keep1}, {"other": keep2}), **built.kwargs)
    with pytest.raises(ValueError, match=r"model_kwargs\[1\] must be a map for x2's examples"):
        ntkcore.ntk(built.model, x1, x2, model_kwargs=({"keep": keep1}, None), **built.kwargs)
    with pytest.raises(TypeError, match=r"model_kwargs must be a map of keyword arguments shared by every call"):
        ntkcore.ntk(built.model, x1, x2, model_kwargs=[1, 2, 3], **built.kwargs)
