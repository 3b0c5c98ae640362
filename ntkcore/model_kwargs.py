"""Keyword arguments of the model's calls (``model_kwargs=``): one map shared by every call
(``deterministic=True``, an rng key, a mask broadcast over the batch), or a pair of maps, one for
x1's examples and one for x2's, whose arrays are per example, with the batch axis first (padding
masks: each example's own).

Per-example arguments travel inside the inputs: x and each argument are flattened per example and
packed side by side into one array, so that every implementation, vmap, tile, store and input
check sees one batch; the model's call unpacks them. The packed dtype holds every value exactly
(checked): integers and booleans with integer inputs, else the inputs' floating dtype.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import compiled
from .inputs import as_batch
from .protocol import ApplyFn, AutodiffBackend

_APPLIES: OrderedDict = OrderedDict()  # the wrapped applies, so that compiled kernels are reused


@dataclass(frozen=True)
class Layout:
    """The per-example shapes and dtypes packed after x's: (name, shape, dtype name) each."""

    x: tuple[tuple[int, ...], Any]
    arguments: tuple[tuple[str, tuple[int, ...], Any], ...]


def split(model_kwargs: Any, two_sides: bool) -> tuple[dict | None, tuple[dict, dict | None] | None]:
    """(shared, per-example pair) from ``model_kwargs``; clear errors for anything else."""
    if model_kwargs is None:
        return None, None
    if isinstance(model_kwargs, Mapping):
        _check_names(model_kwargs, "model_kwargs")
        return dict(model_kwargs), None
    if isinstance(model_kwargs, (tuple, list)) and len(model_kwargs) == 2:
        first, second = model_kwargs
        if not isinstance(first, Mapping) or not (second is None or isinstance(second, Mapping)):
            raise TypeError("model_kwargs=(kw1, kw2) takes two maps name -> per-example array (kw2 None for x2=None)")
        _check_names(first, "model_kwargs[0]")
        if two_sides != (second is not None):
            need = "a map for x2's examples" if two_sides else "None (x2=None is x1 itself)"
            raise ValueError(f"model_kwargs[1] must be {need}")
        if second is not None:
            _check_names(second, "model_kwargs[1]")
            if set(first) != set(second):
                raise ValueError(f"model_kwargs: x1's arguments {sorted(first)} and x2's {sorted(second)} differ")
        return None, (dict(first), None if second is None else dict(second))
    raise TypeError(
        "model_kwargs must be a map of keyword arguments shared by every call, or a pair (kw1, kw2) of maps of "
        f"per-example arrays for x1's and x2's examples, got {type(model_kwargs).__name__}"
    )


def _check_names(kwargs: Mapping, label: str) -> None:
    bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise TypeError(f"{label} keys must be argument names, got {bad}")


def shared_apply(apply: ApplyFn, kwargs: Mapping[str, Any], key: Any) -> ApplyFn:
    """``apply`` with ``kwargs`` in every call; one per (apply, ``key``: :func:`identity` of the
    arguments as given), so compiled kernels are reused while they are the same objects."""
    return compiled.lookup(_APPLIES, ("shared", apply, key), lambda: lambda p, x: apply(p, x, **kwargs))


def native_shared(backend: AutodiffBackend, kwargs: Mapping[str, Any], like: Any) -> dict[str, Any]:
    """Shared arguments with numpy arrays made native (floating ones in ``like``'s dtype)."""
    return {k: _native(backend, v, like) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


def identity(kwargs: Mapping[str, Any] | None) -> tuple | None:
    """What tells shared arguments apart: hashable values by value, arrays by identity."""
    if kwargs is None:
        return None

    def token(value: Any) -> Any:
        try:
            hash(value)
            return ("value", value)
        except TypeError:
            return ("id", id(value))

    return tuple((k, token(v)) for k, v in sorted(kwargs.items()))


def pack(backend: AutodiffBackend, x: Any, arguments: Mapping[str, Any], like: Any, side: str) -> tuple[Any, Layout]:
    """``x`` with its per-example ``arguments`` packed after it, (N, size), native; the packed
    batch then takes the usual input checks."""
    x = as_batch(side, x, backend, like)
    xp = backend.namespace(x)
    n = x.shape[0]
    native = {}
    for name, value in arguments.items():
        try:
            value = backend.asarray(value, like=like) if backend.is_floating(x) else _native(backend, value, like)
        except TypeError as error:
            raise TypeError(f"model_kwargs {side}[{name!r}]: {error}") from None
        if len(value.shape) == 0 or value.shape[0] != n:
            raise ValueError(
                f"model_kwargs {side}[{name!r}] has shape {tuple(value.shape)}, but its examples must match "
                f"{side}'s {n} along the first axis (shared arguments go in a map, not a pair)"
            )
        native[name] = value
    target = (
        x.dtype if backend.is_floating(x) or not any(backend.is_floating(v) for v in native.values()) else like.dtype
    )
    pieces = [x, *native.values()]
    for name, value in (("x", x), *native.items()):
        _check_exact(backend, value, target, name, side)
    flat = [xp.reshape(xp.astype(v, target), (n, -1)) for v in pieces]
    layout = Layout((tuple(x.shape[1:]), x.dtype), tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in native.items()))
    return xp.concat(flat, axis=1), layout


def _native(backend: AutodiffBackend, value: Any, like: Any) -> Any:
    """An integer or boolean argument as a native array (floating ones take ``like``'s dtype)."""
    array = np.asarray(value) if not isinstance(value, backend.native) else None  # type: ignore[attr-defined]
    if array is not None and not np.issubdtype(array.dtype, np.floating):
        return backend.from_numpy(array, like, cast=False)  # type: ignore[attr-defined]
    return backend.asarray(value, like=like)


def _check_exact(backend: AutodiffBackend, value: Any, target: Any, name: str, side: str) -> None:
    """The packed dtype must hold every value exactly (ids above 2**24 do not fit float32)."""
    xp = backend.namespace(value)
    if value.dtype == target:
        return
    back = xp.astype(xp.astype(value, target), value.dtype)
    if not bool(xp.all(back == value)):
        what = "x" if name == "x" else f"model_kwargs {side}[{name!r}]"
        raise ValueError(
            f"{what} ({backend.dtype_name(value)}) cannot be packed with the other inputs exactly; pass integer "
            "arguments with integer inputs, or float64 parameters for integers above 2**24"
        )


def packed_apply(apply: ApplyFn, layout: Layout) -> ApplyFn:
    """``apply`` on packed inputs: unpacks x and the arguments per example, then calls the model;
    one per (apply, layout), so compiled kernels are reused across calls."""

    def make() -> Callable:
        sizes = [math.prod(layout.x[0])] + [math.prod(shape) for _, shape, _ in layout.arguments]
        offsets = np.cumsum([0, *sizes]).tolist()

        def unpacked(p: Any, packed: Any) -> Any:
            from ._xp import namespace_of

            xp = namespace_of(packed)
            n = packed.shape[0]
            parts = [packed[:, offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
            x = xp.astype(xp.reshape(parts[0], (n, *layout.x[0])), layout.x[1])
            kwargs = {
                name: xp.astype(xp.reshape(part, (n, *shape)), dtype)
                for (name, shape, dtype), part in zip(layout.arguments, parts[1:])
            }
            return apply(p, x, **kwargs)

        return unpacked

    return compiled.lookup(_APPLIES, ("packed", apply, layout), make)
