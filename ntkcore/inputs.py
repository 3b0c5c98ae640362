"""Checks on the inputs of a kernel call, made before any work: conversion to the model's
framework, a batch axis, dtypes the model can take, matching per-example shapes, and f's
per-example output shape from one probe."""

from __future__ import annotations

from typing import Any

from .protocol import AutodiffBackend, PreparedModel


def check_input(name: str, x: Any, backend: AutodiffBackend, prepared: PreparedModel, like: Any) -> Any:
    """``x`` as a native array on ``like``'s device, with a batch axis and a dtype the model takes."""
    if like is not None:
        try:
            x = backend.asarray(x, like=like)
        except TypeError as error:
            raise TypeError(f"{name}: {error}") from None
    if len(x.shape) == 0:
        raise ValueError(f"{name} must have a leading batch axis, got a scalar")
    if not backend.is_floating(x) and not prepared.accepts_integer_inputs(x):
        raise TypeError(
            f"{name} has dtype {backend.dtype_name(x)} but the model takes floating-point inputs "
            f"(it has no embedding that consumes integer ids); cast {name} to the parameters' "
            f"dtype {backend.dtype_name(like) if like is not None else ''}".rstrip()
        )
    return x


def check_pair(backend: AutodiffBackend, prepared: PreparedModel, x1: Any, x2: Any) -> tuple[Any, Any]:
    """Both batches checked (``x2=None`` stays ``None``), with the same per-example shape."""
    like = next(iter(prepared.params.values()), None)
    x1 = check_input("x1", x1, backend, prepared, like)
    if x2 is not None:
        x2 = check_input("x2", x2, backend, prepared, like)
        if tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
            raise ValueError(
                f"x2 has per-example shape {tuple(x2.shape[1:])} but x1 has {tuple(x1.shape[1:])}; "
                "both batches must have the same shape apart from the batch axis 0"
            )
    return x1, x2


def output_shape(backend: AutodiffBackend, prepared: PreparedModel, x1: Any, coupled: bool) -> tuple[int, ...]:
    """f's per-example output shape, from one forward pass (of one example unless ``coupled``)."""
    probe = prepared.apply(prepared.params, x1 if coupled else x1[:1])
    if not backend.is_floating(probe):
        raise TypeError(f"model output must be floating point, got dtype {backend.dtype_name(probe)}")
    if len(probe.shape) == 0 or probe.shape[0] != (x1.shape[0] if coupled else 1):
        raise ValueError(
            f"model output of shape {tuple(probe.shape)} has no leading batch axis matching x1's "
            f"{x1.shape[0]} examples; f(params, x) must map (N, ...) to (N, *out)"
        )
    return tuple(int(d) for d in probe.shape[1:])
