"""Checks on the inputs of a kernel call, made before any work, so that bad input gets
ntkcore's own error naming the argument (never a framework's internal one, never a NaN kernel):
conversion to the model's framework and dtype, a non-empty batch axis, dtypes the model takes,
finite values, matching per-example shapes, one probe of the model on one example (f's
per-example output shape), and a probe on two examples that refuses models whose examples
interact (the per-example kernel of such a model would be silently wrong)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .outputs import OutputChoiceError, StructuredOutput, leaves
from .protocol import AutodiffBackend, PreparedModel

# float dtype -> machine epsilon, for the tolerance of the independence probe
_EPSILON = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


class ModelCallError(ValueError):
    """The model cannot be evaluated on the inputs (or parameters) given."""


class BatchCouplingError(ValueError):
    """The model's examples interact, so the per-example kernel would be wrong."""


def all_finite(backend: AutodiffBackend, x: Any) -> bool:
    """Whether every entry of a floating array is finite (computed where the array lives)."""
    xp = backend.namespace(x)
    return bool(xp.all(xp.isfinite(x)))


def first_nonfinite(backend: AutodiffBackend, x: Any) -> tuple[int, ...]:
    """The index of the first entry of ``x`` that is NaN or infinite."""
    found = np.argwhere(~np.isfinite(np.asarray(backend.to_numpy(x), dtype=np.float64)))
    return tuple(int(i) for i in found[0]) if len(found) else ()


def as_batch(name: str, x: Any, backend: AutodiffBackend, like: Any) -> Any:
    """``x`` as a native array like ``like`` (where given), with a batch axis."""
    if like is not None:
        try:
            x = backend.asarray(x, like=like)
        except TypeError as error:
            raise TypeError(f"{name}: {error}") from None
    if len(x.shape) == 0:
        raise ValueError(f"{name} must have a leading batch axis, got a scalar")
    return x


def check_input(
    name: str, x: Any, backend: AutodiffBackend, prepared: PreparedModel, like: Any, check_finite: bool
) -> Any:
    """``x`` as a native array on ``like``'s device (floating point in ``like``'s dtype, numpy
    or native alike), with a non-empty batch axis, a dtype the model takes and finite values."""
    x = as_batch(name, x, backend, like)
    if x.shape[0] == 0:
        raise ValueError(
            f"{name} has no examples (shape {tuple(x.shape)}): a kernel needs at least one example on each side"
        )
    floating = backend.is_floating(x)
    if not floating and not prepared.accepts_integer_inputs(x):
        raise TypeError(
            f"{name} has dtype {backend.dtype_name(x)} but the model takes floating-point inputs "
            f"(it has no embedding that consumes integer ids); cast {name} to the parameters' "
            f"dtype {backend.dtype_name(like) if like is not None else ''}".rstrip()
        )
    if check_finite and floating and not all_finite(backend, x):
        raise ValueError(
            f"{name} has a non-finite entry (NaN or infinity) at index {first_nonfinite(backend, x)}: its "
            "kernel would be NaN. Clean the inputs, or pass check_finite=False to compute it anyway"
        )
    return x


def check_pair(
    backend: AutodiffBackend, prepared: PreparedModel, x1: Any, x2: Any, check_finite: bool = True
) -> tuple[Any, Any]:
    """Both batches checked (``x2=None`` stays ``None``), with the same per-example shape."""
    like = next(iter(prepared.params.values()), None)
    x1 = check_input("x1", x1, backend, prepared, like, check_finite)
    if x2 is not None:
        x2 = check_input("x2", x2, backend, prepared, like, check_finite)
        if tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
            raise ValueError(
                f"x2 has per-example shape {tuple(x2.shape[1:])} but x1 has {tuple(x1.shape[1:])}; "
                "both batches must have the same shape apart from the batch axis 0"
            )
    return x1, x2


def _call(backend: AutodiffBackend, prepared: PreparedModel, name: str, x: Any) -> Any:
    """``apply(params, x)``, its failure reported as ntkcore's error naming the input."""
    try:
        return prepared.apply(prepared.params, x)
    except OutputChoiceError:
        raise
    except Exception as error:
        expected = getattr(backend, "expected_input", lambda prepared: None)(prepared)
        hint = f"; {expected}" if expected else ""
        if isinstance(error, KeyError):
            hint += f"; it reads params[{error.args[0]!r}], which params= lacks" if error.args else ""
        reason = _reason(error)
        raise ModelCallError(
            f"{name}: the model cannot be evaluated on examples of shape {tuple(x.shape[1:])} "
            f"({backend.dtype_name(x)}) with its parameters{hint}. The model raised "
            f"{type(error).__name__}: {reason}"
        ) from error


def _reason(error: Exception) -> str:
    """The informative first line of a framework's error (Keras opens with a generic one)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # terminal colours
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception encountered", "Arguments received"))]
    return (useful or lines or [""])[0][:300]


def output_shape(
    backend: AutodiffBackend, prepared: PreparedModel, x1: Any, coupled: bool, x2: Any = None
) -> tuple[int, ...]:
    """f's per-example output shape, from one forward pass (of one example unless ``coupled``);
    x2 is probed too where its dtype differs from x1's."""
    probe = _call(backend, prepared, "x1", x1 if coupled else x1[:1])
    if x2 is not None and backend.dtype_name(x2) != backend.dtype_name(x1):
        _call(backend, prepared, "x2", x2 if coupled else x2[:1])
    if not hasattr(probe, "shape") or not hasattr(probe, "dtype"):
        paths = leaves(probe)  # a clear error for an output object that holds no arrays we can find
        raise StructuredOutput(
            f"the model returns {type(probe).__name__} of {len(paths)} arrays: ntk() gives a kernel per array in the "
            "same structure; here pass output= (a key or attribute name, or a function of the output) to choose one",
            probe,
            paths,
        )
    if not backend.is_floating(probe):
        raise TypeError(f"model output must be floating point, got dtype {backend.dtype_name(probe)}")
    if len(probe.shape) == 0 or probe.shape[0] != (x1.shape[0] if coupled else 1):
        raise ValueError(
            f"model output of shape {tuple(probe.shape)} has no leading batch axis matching x1's "
            f"{x1.shape[0]} examples; f(params, x) must map (N, ...) to (N, *out)"
        )
    return tuple(int(d) for d in probe.shape[1:])


def _two_examples(backend: AutodiffBackend, x1: Any, x2: Any) -> tuple[Any, Any] | None:
    """Two different examples (batches of one) from x1 and x2, or ``None`` if there are not two."""
    xp = backend.namespace(x1)
    first = x1[:1]
    for pool in (x1, x2):
        for i in range(1 if pool is x1 else 0, min(0 if pool is None else pool.shape[0], 8)):
            other = pool[i : i + 1]
            if not bool(xp.all(other == first)):
                return first, other
    return None


def _host(backend: AutodiffBackend, xp: Any, a: Any) -> Any:
    """A float64 numpy copy (through float32 for dtypes numpy lacks, such as bfloat16)."""
    if backend.dtype_name(a) not in ("float32", "float64"):
        a = xp.astype(a, xp.float32)
    return np.asarray(backend.to_numpy(a), dtype=np.float64)


def check_independent(backend: AutodiffBackend, prepared: PreparedModel, x1: Any, x2: Any) -> None:
    """Refuse a model whose examples interact: f on two examples at once must equal f on each
    alone, to the float tolerance √ε of the output's dtype (one extra forward of two examples)."""
    pair = _two_examples(backend, x1, x2)
    if pair is None:
        return
    xp = backend.namespace(x1)
    together = _call(backend, prepared, "x1", xp.concat(pair, axis=0))
    alone = xp.concat([_call(backend, prepared, "x1", example) for example in pair], axis=0)
    if not all_finite(backend, together):
        return  # nothing to compare; a non-finite kernel is refused when it is computed
    tolerance = math.sqrt(_EPSILON.get(backend.dtype_name(alone), 2.0**-23))
    together, alone = _host(backend, xp, together), _host(backend, xp, alone)
    if np.isfinite(alone).all():
        scale = max(float(np.abs(alone).max()), float(np.abs(together).max()))
        difference = float(np.abs(together - alone).max())
        if difference <= tolerance * scale + 1e-30:
            return
        how = f"by {difference / max(scale, 1e-300):.3g} (relative)"
    else:
        how = "by being finite together and not on each alone"
    raise BatchCouplingError(
        f"model: its examples interact — f on two examples together differs from f on each alone {how}, "
        "so the per-example kernel would be wrong. "
        "Pass batch_independent=False for the exact kernel of the batch as a whole, or make the model "
        "treat examples independently (inference mode, no statistics over the batch)"
    )
