"""Bad input gets a clear error naming the argument, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import ntkcore
from ntkcore.testing import reference_kernel
from tests.models.spec import inputs


def _mlp(zoo):
    built = zoo.build("mlp", "float64")
    x1, x2 = inputs("mlp")
    return built, zoo.to_native(x1, "float64"), zoo.to_native(x2, "float64")


def test_feature_shapes_differ(backend, zoo):
    built, x1, _ = _mlp(zoo)
    wrong = zoo.to_native(np.ones((3, 5)), "float64")
    with pytest.raises(ValueError, match=r"x2 has per-example shape \(5,\) but x1 has \(6,\)"):
        ntkcore.ntk(built.model, x1, wrong, **built.kwargs)


def test_axis_out_of_range(backend, zoo):
    built, x1, x2 = _mlp(zoo)
    with pytest.raises(ValueError, match=r"trace_axes contains axis 2, out of range .* valid axes are -2\.\.1"):
        ntkcore.ntk(built.model, x1, x2, trace_axes=(2,), **built.kwargs)


def test_axis_in_trace_and_diagonal(backend, zoo):
    built, x1, x2 = _mlp(zoo)
    with pytest.raises(ValueError, match="axis 1 is in both trace_axes and diagonal_axes"):
        ntkcore.ntk(built.model, x1, x2, trace_axes=(-1,), diagonal_axes=(1,), **built.kwargs)


def test_integer_inputs_to_float_model(backend, zoo):
    built, _, _ = _mlp(zoo)
    integers = zoo.to_native(np.arange(24).reshape(4, 6), "float64")
    with pytest.raises(TypeError, match=r"x1 has dtype int\w* but the model takes floating-point inputs"):
        ntkcore.ntk(built.model, integers, **built.kwargs)


def test_no_trainable_parameters(backend, zoo):
    built, x1, _ = _mlp(zoo)
    frozen = zoo.freeze(built)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        ntkcore.ntk(frozen.model, x1, **frozen.kwargs)


def test_unknown_implementation(backend, zoo):
    built, x1, _ = _mlp(zoo)
    with pytest.raises(ValueError, match=r"implementation='fastest' is not known; expected one of"):
        ntkcore.ntk(built.model, x1, implementation="fastest", **built.kwargs)


def test_structured_not_yet(backend, zoo):
    if "structured" in zoo.CAPABILITIES:
        pytest.skip(f"{backend} has structured derivatives")
    built, x1, _ = _mlp(zoo)
    with pytest.raises(NotImplementedError, match=rf'"structured" is not available for the {backend} backend yet'):
        ntkcore.ntk(built.model, x1, implementation=ntkcore.Implementation.STRUCTURED, **built.kwargs)


def test_diagonal_batch_needs_equal_sizes(backend, zoo):
    built, x1, x2 = _mlp(zoo)
    with pytest.raises(ValueError, match="x1 has 4 examples and x2 has 3"):
        ntkcore.ntk(built.model, x1, x2, diagonal_axes=(0,), **built.kwargs)


def test_batch_coupled_model(backend, zoo):
    if zoo.train_mode_batchnorm is None:
        pytest.skip(f"{backend} models carry no train/eval mode to detect")
    built, reference = zoo.train_mode_batchnorm("float64")
    x1, x2 = inputs("batchnorm_frozen")
    with pytest.raises(ValueError, match=r"training mode .* batch_independent=False"):
        ntkcore.ntk(built.model, x1, x2)
    expected = reference_kernel(reference(x1), reference(x2), output_ndim=2, trace_axes=(-1,))
    for implementation in ("jacobian_contraction", "ntk_vector_products"):
        kernel = ntkcore.ntk(
            built.model, x1, x2, trace_axes=(-1,), implementation=implementation, batch_independent=False
        )
        np.testing.assert_allclose(zoo.to_numpy(kernel), expected, rtol=1e-10, atol=1e-12)
