"""neural-tangents 0.6.5 on the same JAX functions and weights (run in its own environment).

``nt.empirical_ntk_fn(f, trace_axes, vmap_axes=0, implementation=i)`` under ``jax.jit``,
i = 1 Jacobian contraction, 2 NTK-vector products, 3 structured derivatives, 0 auto. Its
``trace_axes`` takes the mean over the traced axes where ntkcore takes the sum, so traced
kernels are multiplied back by the traced size before they are compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.workloads import Workload

IMPLEMENTATIONS = {"auto": 0, "jacobian_contraction": 1, "ntk_vector_products": 2, "structured": 3}


def kernel_fn(workload: Workload, arrays: dict[str, np.ndarray], implementation: str) -> Any:
    """``ntk(x) -> numpy`` kernel in ntkcore's convention (a traced kernel is a sum)."""
    import jax
    import neural_tangents as nt

    from benchmarks import jax_models

    f, kwargs = jax_models.build(workload, arrays)
    params = kwargs["params"]
    trace_axes = workload.axes.get("trace_axes", ())
    fn = jax.jit(
        nt.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=0, implementation=IMPLEMENTATIONS[implementation])
    )

    def ntk(x: np.ndarray) -> np.ndarray:
        kernel = np.asarray(fn(x, None, params))
        if trace_axes:  # mean → sum
            out = np.asarray(jax.eval_shape(f, params, x[:1]).shape)
            kernel = kernel * np.prod(out[list(trace_axes)])
        return kernel

    return ntk
