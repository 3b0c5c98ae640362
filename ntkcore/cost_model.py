"""Predicted FLOPs, peak memory and time of each implementation, from layer shapes alone.

``implementation="auto"`` and :func:`ntkcore.explain` use it: nothing is computed or compiled,
the adapter's capture of one example gives every parameterised layer call's shape
(:mod:`ntkcore.model_shape`), and each implementation's ``cost`` applies the cost table of
arXiv 2206.08720 term by term, with the contraction orders the structure rules themselves
pick (:func:`ntkcore.rules.dense.orders`). With N examples on a
side, O outputs, P parameters, F forward FLOPs per example (2 per multiply-add of the
parameterised layers; activations and parameter-free products are not counted) and C the
kernel entries per example pair times the contracted output length (O² for the full kernel,
O traced), each implementation's ``cost`` docstring gives its terms.

Time is predicted as overhead + layer calls × per-layer overhead + pass FLOPs / pass rate +
contraction FLOPs / matmul rate + bytes streamed / bandwidth, with constants per backend and
device class fitted to the benchmark harness's measurements (``calibration.json`` next to
this file, written by ``python -m benchmarks.calibrate``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .axes import KernelAxes
from .implementations import REGISTRY
from .model_shape import LayerShape, ModelShape, model_shape
from .sizes import CallSizes

METHODS = tuple(REGISTRY)

__all__ = ["METHODS", "Estimate", "LayerShape", "ModelShape", "constants", "device_class", "estimate", "model_shape"]


@dataclass(frozen=True)
class Estimate:
    """One implementation's predicted cost; ``terms`` holds the FLOPs by kind."""

    implementation: str
    flops: float
    peak_bytes: float
    seconds: float
    terms: Mapping[str, float] = field(default_factory=dict)
    readout: bool = False  # priced with the readout reduction (ntkcore.readout)


def estimate(
    shape: ModelShape,
    implementation: str,
    n1: int,
    n2: int | None,
    out_shape: tuple[int, ...],
    axes: KernelAxes,
    itemsize: int,
    constants: Mapping[str, Any],
    method: Any = None,
) -> Estimate:
    """Predict ``implementation``'s FLOPs, peak bytes and seconds (``n2=None``: x2 = x1, reused).

    ``method`` prices another form of the implementation (one reduced to a model's readout,
    :class:`ntkcore.readout.Reduced`) under its name. Besides the FLOPs, time counts the bytes
    each method streams through memory (``traffic``: Jacobians, tangent activations, rule
    intermediates), not only the peak it holds at once.
    """
    if implementation not in REGISTRY:
        raise ValueError(f"implementation {implementation!r} has no cost model; expected one of {METHODS}")
    cost = (method or REGISTRY[implementation]).cost(shape, CallSizes.of(n1, n2, out_shape, axes), itemsize)
    peak_bytes, traffic = float(cost.peak * itemsize), float(cost.traffic * itemsize)
    seconds = (
        constants["overhead_s"][implementation]
        + shape.calls * constants["per_layer_s"][implementation]
        + cost.passes / constants["pass_flops_per_s"][implementation]
        + cost.contraction / constants["matmul_flops_per_s"]
        + traffic / constants["bytes_per_s"]
    )
    terms = {"passes": cost.passes, "contraction": cost.contraction, "layers": float(shape.calls), "traffic": traffic}
    reduced = method is not None and method is not REGISTRY[implementation]
    return Estimate(implementation, cost.passes + cost.contraction, peak_bytes, seconds, terms, reduced)


CALIBRATION = Path(__file__).with_name("calibration.json")


@cache
def _calibration() -> dict:
    return json.loads(CALIBRATION.read_text())


def constants(backend: str, device_class: str) -> dict:
    """The fitted constants for ``backend`` on ``device_class`` (``"cpu"`` or ``"gpu"``); the
    ``default`` entry of that class where the backend has not been calibrated."""
    table = _calibration()["constants"]
    return table.get(f"{backend}/{device_class}") or table[f"default/{device_class}"]


def device_class(device: Any) -> str:
    """``"gpu"`` for a CUDA/ROCm/GPU device, else ``"cpu"``."""
    text = str(device).lower()
    return "gpu" if any(word in text for word in ("cuda", "gpu", "rocm")) else "cpu"
