"""A third-party adapter used by the tests: pure numpy, derivatives by central differences.

It proves two things: an adapter registered through the ``ntkcore.backends`` entry-point
group is found by name, and the Protocol is all the core needs (no framework anywhere).
Models are ``FDModel(fn, params)`` with ``fn(params, x)`` written in numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ntkcore.protocol import PreparedModel

STEP = 1e-6  # central differences: truncation O(h²) ≈ 1e-12, rounding O(eps/h) ≈ 1e-10


@dataclass
class FDModel:
    fn: Callable
    params: dict


def _flat(params: dict) -> np.ndarray:
    return np.concatenate([np.ravel(v) for v in params.values()])


def _unflat(template: dict, flat: np.ndarray) -> dict:
    out, start = {}, 0
    for k, v in template.items():
        out[k] = flat[start : start + v.size].reshape(v.shape)
        start += v.size
    return out


class FiniteDifferenceBackend:
    name = "numpy_fd"

    def owns(self, model: Any, params: Any, arrays: tuple) -> bool:
        return isinstance(model, FDModel)

    def prepare(self, model: FDModel, params: Any) -> PreparedModel:
        return PreparedModel(model.fn, dict(params if params is not None else model.params))

    def namespace(self, *arrays: Any) -> Any:
        return array_api_compat.array_namespace(*arrays) if arrays else array_api_compat.array_namespace(np.empty(0))

    def asarray(self, x: Any, *, like: Any) -> np.ndarray:
        return np.asarray(x, dtype=like.dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def is_floating(self, x: Any) -> bool:
        return np.issubdtype(np.asarray(x).dtype, np.floating)

    def dtype_name(self, x: Any) -> str:
        return str(np.asarray(x).dtype)

    def _jacobian(self, fn: Callable, primals: dict) -> tuple[np.ndarray, np.ndarray]:
        theta = _flat(primals)
        out = np.asarray(fn(primals))
        columns = []
        for k in range(theta.size):
            step = np.zeros_like(theta)
            step[k] = STEP
            plus = np.asarray(fn(_unflat(primals, theta + step)))
            minus = np.asarray(fn(_unflat(primals, theta - step)))
            columns.append(((plus - minus) / (2 * STEP)).ravel())
        return out, np.stack(columns, axis=1)  # (out.size, P)

    def jvp(self, fn: Callable, primals: dict, tangents: dict) -> tuple:
        out, jac = self._jacobian(fn, primals)
        return out, (jac @ _flat(tangents)).reshape(out.shape)

    def vjp(self, fn: Callable, primals: dict) -> tuple:
        out, jac = self._jacobian(fn, primals)
        return out, lambda ct: _unflat(primals, np.asarray(ct).ravel() @ jac)

    def vmap(self, fn: Callable, in_axes: tuple, chunk_size: int | None = None) -> Callable:
        def mapped(*args: Any) -> Any:
            n = next(
                a.shape[0] if not isinstance(a, dict) else next(iter(a.values())).shape[0]
                for a, ax in zip(args, in_axes)
                if ax == 0
            )
            results = []
            for i in range(n):
                sliced = [
                    ({k: v[i] for k, v in a.items()} if isinstance(a, dict) else a[i]) if ax == 0 else a
                    for a, ax in zip(args, in_axes)
                ]
                results.append(fn(*sliced))
            if isinstance(results[0], dict):
                return {k: np.stack([r[k] for r in results]) for k in results[0]}
            return np.stack(results)

        return mapped

    def jit(self, fn: Callable) -> Callable:
        return fn

    def capture(self, prepared: PreparedModel, x: Any) -> Any:
        raise NotImplementedError
