"""The readout reduction (ntkcore/readout.py): models that end in a wide linear layer get the
same kernel as the general path, in every implementation and axes option, and ``explain``
says when the reduction is taken (a frozen readout too: its weight a constant of the kernel);
models where it would be wrong (a trainable tied readout, a branch added after it) keep the
general path.

Tolerance: float64, relative to the kernel's largest entry, 1e-10 — the two paths sum the same
products in different orders (the sandwich A·Θ_h·Aᵀ against J·Jᵀ over O outputs), rounding
near 1e-15.
"""

from __future__ import annotations

import numpy as np
import pytest

import ntkcore
from ntkcore.implementations import AUTO, REGISTRY
from tests.models.spec import READOUT_VARIANTS, readout_inputs

RTOL = 1e-10
AXES = {
    "full": {},
    "trace": {"trace_axes": (-1,)},
    "diagonal_outputs": {"diagonal_axes": (-1,)},
    "diagonal_batch": {"diagonal_axes": (0,)},
    "trace_tokens": {"trace_axes": (1,)},
    "diagonal_tokens_trace_outputs": {"diagonal_axes": (1,), "trace_axes": (-1,)},
}


def _kernels(zoo, variant: str, axes: dict, **options) -> tuple[np.ndarray, np.ndarray]:
    built = zoo.readout_model(variant)
    x1, x2 = readout_inputs(variant)
    if axes.get("diagonal_axes", ()) and 0 in axes["diagonal_axes"]:
        x1 = x1[: len(x2)]
    x1, x2 = zoo.to_native(x1, "float64"), zoo.to_native(x2, "float64")
    reduced = ntkcore.ntk(built.model, x1, x2, reduce_readout=True, **axes, **options, **built.kwargs)
    general = ntkcore.ntk(built.model, x1, x2, reduce_readout=False, **axes, **options, **built.kwargs)
    if isinstance(reduced, dict):  # per_layer
        assert all(zoo.is_native(part, "float64") for part in reduced.values())
        return {k: zoo.to_numpy(v) for k, v in reduced.items()}, {k: zoo.to_numpy(v) for k, v in general.items()}
    assert zoo.is_native(reduced, "float64")
    return zoo.to_numpy(reduced), zoo.to_numpy(general)


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("variant", list(READOUT_VARIANTS))
def test_explain_reports_the_reduction(backend, zoo, variant):
    built = zoo.readout_model(variant)
    x1, _ = readout_inputs(variant)
    explanation = ntkcore.explain(built.model, zoo.to_native(x1, "float64"), trace_axes=(-1,), **built.kwargs)
    if READOUT_VARIANTS[variant]:
        assert explanation.readout is not None and "d = 4 -> O = 11" in explanation.readout
        assert explanation.readout in str(explanation)
        assert ("+ I" in explanation.readout) == (variant not in ("no_bias", "frozen_readout"))
        assert ("frozen" in explanation.readout) == (variant == "frozen_readout")
    else:
        assert explanation.readout is None
    forced = ntkcore.explain(
        built.model, zoo.to_native(x1, "float64"), trace_axes=(-1,), reduce_readout=True, **built.kwargs
    )
    assert all(e.readout for e in forced.estimates.values()) == READOUT_VARIANTS[variant]
    unreduced = ntkcore.explain(
        built.model, zoo.to_native(x1, "float64"), trace_axes=(-1,), reduce_readout=False, **built.kwargs
    )
    assert unreduced.readout is None and not any(e.readout for e in unreduced.estimates.values())


@pytest.mark.parametrize("implementation", [*REGISTRY, AUTO])
@pytest.mark.parametrize("variant", list(READOUT_VARIANTS))
def test_equals_the_general_path(backend, zoo, variant, implementation):
    if implementation == "structured" and "structured" not in zoo.CAPABILITIES:
        pytest.skip("no per-layer capture")
    for axes in ("full", "trace"):
        _assert_close(*_kernels(zoo, variant, AXES[axes], implementation=implementation))


@pytest.mark.parametrize("axes", [a for a in AXES if a not in ("full", "trace")])
def test_every_axes_option(backend, zoo, axes):
    _assert_close(*_kernels(zoo, "bias", AXES[axes], implementation="structured"))


@pytest.mark.parametrize("variant", ["bias", "frozen_body"])
def test_per_layer(backend, zoo, variant):
    layers, general = _kernels(zoo, variant, {}, per_layer=True)
    assert set(layers) == set(general)
    for name in layers:
        _assert_close(layers[name], general[name])
