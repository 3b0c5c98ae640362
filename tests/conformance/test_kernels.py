"""Every backend × zoo case × implementation × axes option against the float64 reference.

Test bodies hold no framework code: models, conversions and reference Jacobians come from
the zoo module of the backend under test.

Tolerances (max-abs error relative to the kernel's largest entry, so that entries near zero
do not dominate): float64 1e-10 — the contractions sum a few hundred products, so rounding
stays near 1e-14 and 1e-10 leaves room for different summation orders on any BLAS; float32
1e-4 — unit roundoff 6e-8 times the same sums with cancellation, observed ≤ 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

import ntkcore
from ntkcore.implementations import AUTO, REGISTRY
from ntkcore.testing import reference_kernel
from tests.models.spec import CASES, inputs, spec

IMPLEMENTATIONS = (*REGISTRY, AUTO)
AXES = {
    "full": {},
    "trace": {"trace_axes": (-1,)},
    "diag": {"diagonal_axes": (0,)},
    "both": {"trace_axes": (-1,), "diagonal_axes": (0,)},
}
RTOL = {"float64": 1e-10, "float32": 1e-4}


def _pair(case: str, axes: str, x2_mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    x1, x2 = inputs(case)
    if x2_mode == "self":
        return x1, None
    # diagonal over the batch pairs x1[i] with x2[i]: equal batch sizes
    return (x1[: len(x2)], x2) if "diagonal_axes" in AXES[axes] else (x1, x2)


_REFERENCES: dict = {}


def reference(zoo, case: str, x1: np.ndarray, x2: np.ndarray | None, axes: str) -> np.ndarray:
    """The float64 reference kernel from the framework's own full-batch Jacobians."""
    key = (zoo.__name__, case, x1.tobytes(), None if x2 is None else x2.tobytes(), axes)
    if key not in _REFERENCES:
        j1 = zoo.reference_jacobians(case, x1)
        j2 = j1 if x2 is None else zoo.reference_jacobians(case, x2)
        ndim = len(spec(case).output_shape) + 1
        _REFERENCES[key] = reference_kernel(j1, j2, output_ndim=ndim, **AXES[axes])
    return _REFERENCES[key]


def compute(zoo, case: str, dtype: str, x1, x2, implementation: str, axes: str):
    built = zoo.build(case, dtype)
    native2 = None if x2 is None else zoo.to_native(x2, dtype)
    return ntkcore.ntk(
        built.model, zoo.to_native(x1, dtype), native2, implementation=implementation, **AXES[axes], **built.kwargs
    )


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    assert actual.shape == expected.shape
    error = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert error <= rtol, f"relative max error {error:.3g} > {rtol:g}"


def require(zoo, implementation: str) -> None:
    """Skip an implementation the backend does not have yet (capability data in the zoo)."""
    if implementation == "structured" and "structured" not in zoo.CAPABILITIES:
        pytest.skip(f"{zoo.__name__}: no per-layer capture yet")


@pytest.mark.filterwarnings("ignore::ntkcore.StructuredFallbackWarning")
@pytest.mark.parametrize("x2_mode", ["x2", "self"])
@pytest.mark.parametrize("axes", list(AXES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_kernel_float64(backend, zoo, case, implementation, axes, x2_mode):
    require(zoo, implementation)
    x1, x2 = _pair(case, axes, x2_mode)
    kernel = compute(zoo, case, "float64", x1, x2, implementation, axes)
    assert zoo.is_native(kernel, "float64"), f"result is {type(kernel)}, not a {backend} float64 array"
    n1, n2 = len(x1), len(x1) if x2 is None else len(x2)
    out = spec(case).output_shape
    expected_shape = ntkcore.KernelAxes.create(
        AXES[axes].get("trace_axes", ()), AXES[axes].get("diagonal_axes", ()), (n1, *out)
    ).kernel_shape((n1, *out), (n2, *out))
    result = zoo.to_numpy(kernel)
    assert result.shape == expected_shape
    assert_close(result, reference(zoo, case, x1, x2, axes), RTOL["float64"])
    if x2 is None and "diagonal_axes" not in AXES[axes]:
        matrix = np.asarray(ntkcore.flatten(result))
        assert np.max(np.abs(matrix - matrix.T)) <= 1e-12 * np.max(np.abs(matrix))
        assert np.linalg.eigvalsh(matrix).min() >= -1e-10 * np.max(np.abs(matrix)), "kernel is not PSD"


@pytest.mark.filterwarnings("ignore::ntkcore.StructuredFallbackWarning")
@pytest.mark.parametrize("case", CASES)
def test_kernel_float32_implementations_agree(backend, zoo, case):
    x1, x2 = inputs(case)
    expected = reference(zoo, case, x1, x2, "full")
    kernels = {}
    available = [i for i in IMPLEMENTATIONS if i != "structured" or "structured" in zoo.CAPABILITIES]
    for implementation in available:
        kernel = compute(zoo, case, "float32", x1, x2, implementation, "full")
        assert zoo.is_native(kernel, "float32"), f"{implementation}: result is not a {backend} float32 array"
        kernels[implementation] = zoo.to_numpy(kernel)
        assert_close(kernels[implementation], expected, RTOL["float32"])
    for implementation in available:
        assert_close(kernels[implementation], kernels["jacobian_contraction"], RTOL["float32"])


@pytest.mark.parametrize("case", ["mlp", "multi_output"])
def test_ntk_fn_reuses_and_matches(backend, zoo, case):
    built = zoo.build(case, "float64")
    x1, x2 = inputs(case)
    kernel_fn = ntkcore.ntk_fn(built.model, trace_axes=(-1,), **built.kwargs)
    first = zoo.to_numpy(kernel_fn(zoo.to_native(x1, "float64"), zoo.to_native(x2, "float64")))
    again = zoo.to_numpy(kernel_fn(zoo.to_native(x1, "float64"), zoo.to_native(x2, "float64")))
    assert_close(first, reference(zoo, case, x1, x2, "trace"), RTOL["float64"])
    np.testing.assert_array_equal(first, again)
    # numpy inputs are accepted and converted to the model's dtype
    from_numpy = zoo.to_numpy(kernel_fn(x1, x2))
    assert_close(from_numpy, first, RTOL["float64"])


@pytest.mark.parametrize("case", ["mlp", "multi_output", "cnn"])
def test_nngp(backend, zoo, case):
    built = zoo.build(case, "float64")
    x1, x2 = inputs(case)
    kernel = ntkcore.nngp(
        built.model, zoo.to_native(x1, "float64"), zoo.to_native(x2, "float64"), trace_axes=(-1,), **built.kwargs
    )
    f1 = zoo.to_numpy(zoo.forward(built, x1))
    f2 = zoo.to_numpy(zoo.forward(built, x2))
    expected = np.einsum("i...k,j...k->ij...", f1, f2) if f1.ndim == 2 else np.einsum("iak,jbk->ijab", f1, f2)
    assert_close(zoo.to_numpy(kernel), expected, RTOL["float64"])


@pytest.mark.filterwarnings("ignore::ntkcore.StructuredFallbackWarning")
@pytest.mark.parametrize("axes", ["full", "trace"])
@pytest.mark.parametrize("case", ["mlp", "transformer"])
def test_chunked_and_blocked_paths(backend, zoo, case, axes, monkeypatch):
    """NTK-vector products over x2 in chunks of 2 (with a remainder) and Jacobian contraction
    summed over contraction blocks of 7 elements give the same kernel as the one-shot paths."""
    from ntkcore import compiled, contraction
    from ntkcore.implementations import ntk_vector_products

    monkeypatch.setattr(compiled, "_COMPILED", type(compiled._COMPILED)())  # trace afresh with the patched sizes
    monkeypatch.setattr(ntk_vector_products, "chunk_size", lambda *args: 2)
    monkeypatch.setattr(contraction, "CONTRACT_BLOCK", 7)
    x1, x2 = inputs(case)
    assert len(x2) % 2 == 1 or len(x1) % 2 == 1, "the chunks should leave a remainder"
    for implementation in ("ntk_vector_products", "jacobian_contraction"):
        for other in (x2, None):
            kernel = zoo.to_numpy(compute(zoo, case, "float64", x1, other, implementation, axes))
            assert_close(kernel, reference(zoo, case, x1, other, axes), RTOL["float64"])
