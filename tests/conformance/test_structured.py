"""Structured derivatives on the cases that stress their rules: shared layers, tied weights,
token axes, embeddings, normalisations, and a layer without a rule (exact fallback, warned).

Each kernel is held to Jacobian contraction in float64 (rtol 1e-10, see test_kernels.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ntkcore

AXES = {
    "full": {},
    "trace": {"trace_axes": (-1,)},
    "diag": {"diagonal_axes": (0,)},
    "both": {"trace_axes": (-1,), "diagonal_axes": (0,)},
}


def _cases(backend, zoo):
    if "structured" not in zoo.CAPABILITIES:
        pytest.skip(f"{backend}: no per-layer capture yet")
    return zoo.STRUCTURED_CASES


@pytest.mark.parametrize("case", ["twice", "norule", "tied", "attention", "norms", "convs"])
@pytest.mark.parametrize("axes", list(AXES))
@pytest.mark.parametrize("x2_mode", ["x2", "self"])
def test_structured_equals_jacobian_contraction(backend, zoo, case, axes, x2_mode):
    if case not in _cases(backend, zoo):
        pytest.skip(f"{backend} has no {case!r} structured case")
    built, x1, x2, fallback = zoo.structured_case(case)
    if x2_mode == "self":
        x2 = None
    elif "diagonal_axes" in AXES[axes]:
        x1 = x1[: len(x2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = ntkcore.ntk(built.model, x1, x2, implementation="structured", **AXES[axes], **built.kwargs)
    expected = ntkcore.ntk(built.model, x1, x2, implementation="jacobian_contraction", **AXES[axes], **built.kwargs)
    kernel, expected = zoo.to_numpy(kernel), zoo.to_numpy(expected)
    assert kernel.shape == expected.shape
    assert np.max(np.abs(kernel - expected)) <= 1e-10 * np.max(np.abs(expected))
    messages = [str(w.message) for w in caught if issubclass(w.category, ntkcore.StructuredFallbackWarning)]
    if fallback is None:
        assert messages == []
    else:
        assert len(messages) == 1 and fallback in messages[0], messages


def test_factorized_layer_is_structured(backend, zoo):
    """ntkcore's factorized dense layer is two dense pieces: no fallback, exact kernel."""
    if "structured" not in zoo.CAPABILITIES:
        pytest.skip(f"{backend}: no per-layer capture yet")
    built = zoo.factorized_case()
    x1, x2 = (zoo.to_native(a, "float64") for a in (np.ones((3, 6)) * np.arange(3)[:, None], np.eye(2, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ntkcore.StructuredFallbackWarning)
        kernel = ntkcore.ntk(built.model, x1, x2, implementation="structured", **built.kwargs)
    expected = ntkcore.ntk(built.model, x1, x2, implementation="jacobian_contraction", **built.kwargs)
    np.testing.assert_allclose(zoo.to_numpy(kernel), zoo.to_numpy(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order", ["pairwise", "per_example"])
def test_convolutions_in_either_order(backend, zoo, order, monkeypatch):
    """Every convolution of the ``convs`` case (strided, dilated, padded, grouped, depthwise, 1D,
    torch's 3D one with circular padding) held to Jacobian contraction with the conv rule's order
    forced: the pairwise order on patches (torch and TensorFlow form them on request) and
    per-example gradients (the framework's own where it differentiates convolutions)."""
    if "convs" not in _cases(backend, zoo):
        pytest.skip(f"{backend} has no 'convs' structured case")
    from ntkcore.rules import conv

    chosen = conv.orders

    def forced(*args, **kwargs):
        return {name: (0.0 if name == order else 1.0, *rest) for name, (_, *rest) in chosen(*args, **kwargs).items()}

    monkeypatch.setattr(conv, "orders", forced)
    built, x1, x2, _ = zoo.structured_case("convs")
    layers = ntkcore.explain(built.model, x1, x2, implementation="structured", **built.kwargs).layers
    described = {layer.rule for layer in layers if layer.kind == "conv"}
    if order == "per_example" and backend != "jax":
        assert described == {"conv: per-example gradients from the framework's backward pass"}
    else:
        assert {rule.partition(" (")[0] for rule in described} == {f"conv rule, {order.replace('_', '-')} order"}
    for axes in AXES.values():
        first = x1[: len(x2)] if "diagonal_axes" in axes else x1
        kernel = ntkcore.ntk(built.model, first, x2, implementation="structured", **axes, **built.kwargs)
        expected = ntkcore.ntk(built.model, first, x2, implementation="jacobian_contraction", **axes, **built.kwargs)
        kernel, expected = zoo.to_numpy(kernel), zoo.to_numpy(expected)
        assert np.max(np.abs(kernel - expected)) <= 1e-10 * np.max(np.abs(expected))
