"""Cross-framework validation in one process: the same case gives the same kernel everywhere.

float64 agrees to 1e-10 (every framework computes the same float64 arithmetic up to
summation order); float32 to 1e-4 (see tests/conformance/test_kernels.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import ntkcore
from tests.conftest import zoo_for
from tests.models.spec import CASES, inputs

pytestmark = pytest.mark.cross
RTOL = {"float64": 1e-10, "float32": 1e-4}


@pytest.mark.filterwarnings("ignore::ntkcore.StructuredFallbackWarning")
@pytest.mark.parametrize("implementation", ["jacobian_contraction", "ntk_vector_products", "structured"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_same_kernel_in_every_framework(active_backends, case, dtype, implementation):
    if len(active_backends) < 2:
        pytest.skip(f"needs two frameworks in this run, have {active_backends}")
    x1, x2 = inputs(case)
    kernels = {}
    for name in active_backends:
        zoo = zoo_for(name)
        built = zoo.build(case, dtype)
        kernel = ntkcore.ntk(
            built.model,
            zoo.to_native(x1, dtype),
            zoo.to_native(x2, dtype),
            implementation=implementation,
            trace_axes=(-1,),
            **built.kwargs,
        )
        assert zoo.is_native(kernel, dtype)
        kernels[name] = zoo.to_numpy(kernel)
    for (a, ka), (b, kb) in itertools.combinations(kernels.items(), 2):
        error = np.max(np.abs(ka - kb)) / np.max(np.abs(ka))
        assert error <= RTOL[dtype], f"{a} vs {b}: relative max difference {error:.3g}"
