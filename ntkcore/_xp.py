"""Array-namespace lookup for the core: array-api-compat first, adapters' shims second."""

from __future__ import annotations

from typing import Any

import array_api_compat


def namespace_of(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays``.

    array-api-compat covers numpy, JAX, PyTorch, CuPy, Dask and array-api-strict; a framework
    it does not cover (TensorFlow) is served by its adapter's shim, found among the frameworks
    the caller has already imported.
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError:
        from .registry import backend_for_arrays

        backend = backend_for_arrays(*arrays)
        if backend is None:
            raise TypeError(
                "expected arrays of one array-API compatible library (numpy, JAX, PyTorch, "
                f"TensorFlow, ...), got {sorted({type(a).__name__ for a in arrays})}"
            ) from None
        return backend.namespace(*arrays)


def diagonal_last2(xp: Any, a: Any) -> Any:
    """The diagonal of the last two (equal-sized) axes, as one trailing axis.

    Written with reshape and a strided slice, both in the array API standard (there is no
    general ``diagonal`` in the main namespace).
    """
    n = a.shape[-1]
    flat = xp.reshape(a, (*a.shape[:-2], n * n))
    return flat[..., :: n + 1]
