"""Recurrent layers as users write them — torch nn.RNN/LSTM/GRU (batch-first or not,
bidirectional, stacked), Keras SimpleRNN/LSTM/GRU, JAX ``lax.scan`` (by hand, flax linen
``nn.RNN``, an equinox cell) — exact on every implementation against the float64 reference of
the framework's own autodiff. torch's and JAX's cells are structured (their projections are
dense layers at every step): nothing falls back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ntkcore
from ntkcore.implementations import AUTO, REGISTRY
from ntkcore.testing import reference_kernel

RTOL = 1e-10  # float64, as the conformance suite's kernels: sums of a few hundred products


@pytest.mark.parametrize("implementation", [*REGISTRY, AUTO])
def test_recurrent_layers_are_exact(backend, zoo, implementation):
    x = np.random.default_rng(0).normal(size=(3, 6, 4))
    for name, (built, reference) in zoo.recurrent_models().items():
        expected = reference_kernel(reference(x), output_ndim=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ntkcore.StructuredFallbackWarning)
            kernel = zoo.to_numpy(ntkcore.ntk(built.model, x, implementation=implementation, **built.kwargs))
        scale = np.abs(expected).max()
        np.testing.assert_allclose(kernel, expected, rtol=0, atol=RTOL * scale, err_msg=f"{backend} {name}")


def test_recurrent_layers_are_structured(backend, zoo):
    if backend == "tensorflow":
        pytest.skip("Keras cells run unrolled with their weights on the exact per-layer path")
    x = np.random.default_rng(0).normal(size=(3, 6, 4))
    for name, (built, _) in zoo.recurrent_models().items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", ntkcore.StructuredFallbackWarning)  # nothing falls back
            ntkcore.ntk(built.model, x, implementation="structured", **built.kwargs)
        layers = ntkcore.explain(built.model, x, **built.kwargs).layers
        assert all(not layer.rule.startswith("exact") for layer in layers), name
