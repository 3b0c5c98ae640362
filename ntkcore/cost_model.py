"""Predicted FLOPs, peak memory and time of each implementation, from layer shapes alone.

``implementation="auto"`` and :func:`ntkcore.explain` use it: nothing is computed or compiled,
the adapter's capture of one example gives every parameterised layer call's shape, and the
cost table of arXiv 2206.08720 is applied term by term, with the contraction orders the
structure rules themselves pick (:func:`ntkcore.rules.dense_orders`). With N examples on a
side, O outputs, P parameters, F forward FLOPs per example (2 per multiply-add of the
parameterised layers; activations and parameter-free products are not counted) and C the
kernel entries per example pair times the contracted output length (O² for the full kernel,
O traced):

- Jacobian contraction: N·(F + 2·O·F) for the Jacobians (a backward pass is 2F), then
  2·N1·N2·C·P for the contraction;
- NTK-vector products: N2·(F + 2·O·F) for the vjps, then N1·N2·O forward-mode passes of 3F
  (N·O with ``diagonal_axes=(0,)``);
- structured derivatives: N·(F + O·F) for the cotangents (input cotangents only), N·O·F_d
  more for the weight gradients of parameters differentiated directly (fallbacks, kinds the
  framework differentiates; F_d their layers' forward FLOPs), then each layer's rule and
  the contraction of the direct ones.

Time is predicted as overhead + layer calls × per-layer overhead + pass FLOPs / pass rate +
contraction FLOPs / matmul rate + bytes streamed / bandwidth, with constants per backend and
device class fitted to the benchmark harness's measurements (``calibration.json`` next to
this file, written by ``python -m benchmarks.calibrate``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .algorithms.ntk_vector_products import chunk_examples
from .axes import KernelAxes
from .rules import dense_orders, output_pairs, pair_entries

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured")


@dataclass(frozen=True)
class LayerShape:
    """One captured layer (all its calls): what its rule's cost depends on.

    ``sizes`` maps the rule's roles to parameter sizes; ``tokens`` counts the positions that
    share the weights over all calls (S), ``features`` the output features (F), ``fan_in``
    the inputs per output feature of a dense layer or convolution. ``rule`` says how
    structured derivatives treat it: the kind's rule, ``"framework"`` (per-example gradients
    from the framework's backward pass) or ``"fallback: <why>"``.
    """

    name: str
    kind: str
    sizes: Mapping[str, int]
    tokens: int
    features: int
    fan_in: int
    rule: str


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost table needs: P, F, per-example activations, and the layers."""

    params: int
    forward_flops: float
    activations: int
    layers: tuple[LayerShape, ...] = ()
    direct_flops: float = 0.0  # forward FLOPs of layers whose weights SD differentiates directly
    calls: int = 1  # parameterised layer calls (or parameter arrays): per-call overheads


@dataclass(frozen=True)
class Estimate:
    """One implementation's predicted cost; ``terms`` holds the FLOPs by kind."""

    implementation: str
    flops: float
    peak_bytes: float
    seconds: float
    terms: Mapping[str, float] = field(default_factory=dict)


def model_shape(capture: Any, params: Mapping[str, Any], plan: tuple | None) -> ModelShape:
    """The sizes of a captured model (``capture`` may be ``None`` where an adapter cannot
    capture: F is then taken as 2P and activations as √P per example, rough figures)."""
    sizes = {name: math.prod(p.shape) for name, p in params.items()}
    total = sum(sizes.values())
    if capture is None or plan is None:
        return ModelShape(total, 2.0 * total, max(1, math.isqrt(total)), calls=len(sizes))
    groups, shared, fallback, reasons = plan
    forward = direct_flops = 0.0
    activations = 0
    for use in capture.uses:
        shape = capture.output_shapes[use.key]
        features = shape[use.feature_axis]
        tokens = math.prod(shape) // max(features, 1)
        activations += math.prod(shape)
        weight = sizes.get(use.params.get("weight", ""), 0)
        if use.kind in ("dense", "conv") and weight > features:  # fan-in 1 (a bias add in JAX): elementwise
            forward += 2.0 * tokens * weight
            if use.params["weight"] in fallback:  # its weight gradient comes from the backward passes
                direct_flops += 2.0 * tokens * weight
        elif use.kind == "affine":
            forward += 4.0 * tokens * features
    used = {name for use in capture.uses for name in use.params.values()}
    forward += 2.0 * sum(n for name, n in sizes.items() if name not in used)  # uncaptured: once each
    framework = capture.framework_gradients
    layers = []
    direct_flops += 2.0 * sum(sizes[name] for name in fallback if name not in used)
    for group in groups:
        use = group[0]
        shapes = [capture.output_shapes[u.key] for u in group]
        features = shapes[0][use.feature_axis]
        tokens = sum(math.prod(s) // max(features, 1) for s in shapes)
        roles = {role: sizes[name] for role, name in use.params.items()}
        fan_in = roles.get("weight", 0) // max(features, 1)
        rule = "framework" if use.kind in framework else use.kind
        if use.kind in framework:
            direct_flops += 2.0 * tokens * roles.get("weight", 0)
        layers.append(LayerShape(use.layer, use.kind, roles, tokens, features, fan_in, rule))
    for use in shared:  # per-example gradients of a parameter tied across kinds, summed
        shape = capture.output_shapes[use.key]
        features = shape[use.feature_axis]
        roles = {role: sizes[name] for role, name in use.params.items()}
        tokens = math.prod(shape) // max(features, 1)
        layers.append(LayerShape(use.layer, use.kind, roles, tokens, features, 0, "shared"))
    why = "; ".join(reasons) or "no rule"
    for name in fallback:
        layers.append(LayerShape(name, "parameter", {"": sizes[name]}, 1, 1, 0, f"fallback: {why}"))
    calls = len(capture.uses) + sum(1 for name in sizes if name not in used)
    return ModelShape(total, forward, activations, tuple(layers), direct_flops, calls=max(calls, 1))


def _structured_terms(
    shape: ModelShape, n1: int, n2: int, reuse: bool, out_shape: tuple[int, ...], axes: KernelAxes
) -> tuple[float, float, float, float]:
    """(contraction FLOPs, largest rule intermediate, all rule intermediates, direct gradients) of
    the rules; sizes in elements."""
    o = math.prod(out_shape)
    nx = n1 if reuse else n1 + n2
    examples = n1 if 0 in axes.diagonal else n1 * n2
    pairs = examples * output_pairs(axes, out_shape)
    flops = largest = written = gradients = 0.0
    for layer in shape.layers:
        size = sum(layer.sizes.values())
        if layer.rule == "dense":
            orders = dense_orders(n1, n2, layer.tokens, layer.fan_in + 1, layer.features, out_shape, axes)
            _, cost, elements = min(orders.values())
        elif layer.rule == "embedding":
            cost = 2.0 * pairs * layer.tokens**2 * layer.features
            elements = float(examples * pair_entries(axes, out_shape) * layer.tokens**2)
        elif layer.rule in ("conv", "affine", "shared"):  # per-example gradients, then contracted
            cost = 2.0 * nx * o * layer.tokens * size + 2.0 * pairs * size
            elements = float(nx * o * size)
        else:  # framework gradients and fallbacks: contracted with the direct Jacobians
            cost, elements = 2.0 * pairs * size, 0.0
            gradients += nx * o * size
        flops += cost
        largest = max(largest, elements)
        written += elements
    return flops, largest, written, gradients


def estimate(
    shape: ModelShape,
    implementation: str,
    n1: int,
    n2: int | None,
    out_shape: tuple[int, ...],
    axes: KernelAxes,
    itemsize: int,
    constants: Mapping[str, Any],
) -> Estimate:
    """Predict ``implementation``'s FLOPs, peak bytes and seconds (``n2=None``: x2 = x1, reused).

    Besides the FLOPs, time counts the bytes each method streams through memory (``traffic``:
    Jacobians, tangent activations, rule intermediates), not only the peak it holds at once.
    """
    reuse = n2 is None
    n2 = n1 if n2 is None else n2
    nx = n1 if reuse else n1 + n2
    o = math.prod(out_shape)
    p, f, a = shape.params, shape.forward_flops, shape.activations
    examples = n1 if 0 in axes.diagonal else n1 * n2
    kernel = examples * pair_entries(axes, out_shape)
    if implementation == "jacobian_contraction":
        passes = nx * (f + 2.0 * o * f)
        contraction = 2.0 * examples * output_pairs(axes, out_shape) * p
        peak = nx * o * p + max(n1, n2) * o * a + kernel
        traffic = nx * o * (p + a) + kernel
    elif implementation == "ntk_vector_products":
        if 0 in axes.diagonal:
            passes = n1 * (f + 2.0 * o * f) + n1 * o * 3.0 * f
            peak = traffic = n1 * o * (p + a) + kernel
        else:
            chunk = chunk_examples(itemsize, p, n2, o) or n2
            passes = n2 * (f + 2.0 * o * f) + n1 * n2 * o * 3.0 * f
            peak = chunk * o * (p + n1 * a) + n2 * o * n1 * o + kernel
            traffic = n2 * o * (p + n1 * a) + n2 * o * n1 * o + kernel
        contraction = 0.0
    elif implementation == "structured":
        passes = nx * (f + o * f) + nx * o * shape.direct_flops
        contraction, largest, written, gradients = _structured_terms(shape, n1, n2, reuse, out_shape, axes)
        peak = nx * o * a + nx * a + largest + gradients + kernel
        traffic = nx * o * a + nx * a + written + gradients + kernel
    else:
        raise ValueError(f"implementation {implementation!r} has no cost model; expected one of {METHODS}")
    peak_bytes, traffic = float(peak * itemsize), float(traffic * itemsize)
    seconds = (
        constants["overhead_s"][implementation]
        + shape.calls * constants["per_layer_s"][implementation]
        + passes / constants["pass_flops_per_s"][implementation]
        + contraction / constants["matmul_flops_per_s"]
        + traffic / constants["bytes_per_s"]
    )
    terms = {"passes": passes, "contraction": contraction, "layers": float(shape.calls), "traffic": traffic}
    return Estimate(implementation, passes + contraction, peak_bytes, seconds, terms)


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
