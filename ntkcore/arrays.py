"""Array helpers shared by the implementations and the rules (array-API terms, no framework)."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat


def device_of(x: Any) -> Any:
    """The array's device, or ``None`` where it cannot be asked (tracers, shims)."""
    try:
        return array_api_compat.device(x)
    except Exception:
        return None


def zeros(xp: Any, shapes: Any, like: Any) -> dict[str, Any]:
    """``name -> zeros`` of each shape in ``shapes`` (a map), in ``like``'s dtype and device: the
    probes that leave a captured model's output unchanged."""
    device = device_of(like)
    kwargs = {} if device is None else {"device": device}
    return {k: xp.zeros(shape, dtype=like.dtype, **kwargs) for k, shape in shapes.items()}


def output_basis(xp: Any, out: Any) -> Any:
    """The standard basis of ``out``'s space, shape ``(out.size, *out.shape)``, same dtype/device."""
    size = math.prod(out.shape)
    device = device_of(out)
    kwargs = {} if device is None else {"device": device}
    return xp.reshape(xp.eye(size, dtype=out.dtype, **kwargs), (size, *out.shape))


_ITEMSIZE = {"float64": 8, "complex64": 8, "complex128": 16, "float16": 2, "bfloat16": 2, "float32": 4}


def itemsize(dtype_name: str) -> int:
    """Bytes per element of a floating dtype named as adapters name it (float32 if unknown)."""
    return _ITEMSIZE.get(dtype_name, 4)


def layer_name(param: str) -> str:
    """The layer a parameter belongs to: its name up to the last ``.`` or ``/`` (torch
    ``"fc1.weight"``, Keras ``"dense/kernel"``, JAX ``"params.Dense_0.kernel"``), or the name
    itself when it has no separator (a JAX dict ``{"w1": ..., "b1": ...}``)."""
    cut = max(param.rfind("."), param.rfind("/"))
    return param[:cut] if cut > 0 else param


def layers_of(names: Any, key: Any = layer_name) -> dict[str, list[str]]:
    """Layer -> its parameter names, in order; the layer of a name is ``key(name)``
    (:func:`layer_name` by default)."""
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(key(name), []).append(name)
    return layers
