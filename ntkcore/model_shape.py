"""The sizes of a captured model that the cost table needs: P, forward FLOPs, activations, and
each layer as structured derivatives would treat it. Nothing is computed or compiled: the
adapter's capture of one example gives every parameterised layer call's shape."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .rules import RULES
from .rules.base import token_count
from .rules.tied import pairs_of as tied_pairs
from .sizes import CallSizes

FRAMEWORK, SHARED, TIED, FALLBACK = "framework", "shared", "tied", "fallback: "  # LayerShape.rule besides a kind


@dataclass(frozen=True)
class LayerShape:
    """One captured layer (all its calls): what its rule's cost depends on.

    ``sizes`` maps the rule's roles to parameter sizes; ``tokens`` counts the positions that
    share the weights over all calls (S), ``features`` the output features (F), ``fan_in``
    the inputs per output feature of a dense layer or convolution. ``rule`` says how
    structured derivatives treat it: the kind's rule, ``"framework"`` (per-example gradients
    from the framework's backward pass), ``"tied"`` (a table tied between embedding and dense
    calls: each call's rule and their cross terms), ``"shared"`` (another parameter tied across
    kinds: per-example gradients summed) or ``"fallback: <why>"``. ``groups``: a grouped
    convolution's; ``on_request``: a layer the framework differentiates whose structured input
    the adapter forms on request
    (``Capture.deferred_inputs``), so that its rule may take it instead (:func:`by_framework`).
    """

    name: str
    kind: str
    sizes: Mapping[str, int]
    tokens: int
    features: int
    fan_in: int
    rule: str
    groups: int = 1
    on_request: bool = False


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost table needs: P, F, per-example activations, and the layers."""

    params: int
    forward_flops: float
    activations: int
    layers: tuple[LayerShape, ...] = ()
    direct_flops: float = 0.0  # forward FLOPs of the fallbacks SD differentiates directly (see by_framework)
    calls: int = 1  # parameterised layer calls (or parameter arrays): per-call overheads


def _role_sizes(use: Any, sizes: Mapping[str, int]) -> dict[str, int]:
    return {role: sizes.get(name, 0) for role, name in use.params.items()}


def _forward(capture: Any, sizes: Mapping[str, int], fallback: list[str]) -> tuple[float, float, int]:
    """(forward FLOPs, FLOPs of the fallback matmuls, activations) over the captured calls."""
    forward = direct = 0.0
    activations = 0
    for use in capture.uses:
        shape = capture.output_shapes[use.key]
        tokens, features = token_count(shape, use.feature_axis)
        activations += math.prod(shape)
        rule = RULES[use.kind]
        flops = rule.forward_flops(tokens, features, _role_sizes(use, sizes))
        forward += flops
        if rule.matmul_role and use.params.get(rule.matmul_role) in fallback:  # from the backward passes
            direct += flops
    return forward, direct, activations


def group_layer(capture: Any, group: list, sizes: Mapping[str, int]) -> LayerShape:
    use = group[0]
    features = capture.output_shapes[use.key][use.feature_axis]
    tokens = sum(token_count(capture.output_shapes[u.key], use.feature_axis)[0] for u in group)
    roles = _role_sizes(use, sizes)
    framework = use.kind in capture.framework_gradients
    rule = FRAMEWORK if framework else use.kind
    on_request = framework and all(u.layer in capture.deferred_inputs for u in group)
    fan_in = RULES[use.kind].fan_in(roles, features)
    return LayerShape(use.layer, use.kind, roles, tokens, features, fan_in, rule, use.groups, on_request)


def by_framework(layer: LayerShape, sizes: CallSizes) -> bool:
    """Whether structured derivatives take this layer's per-example gradients from the
    framework's backward pass at these sizes (else its rule, on its input formed on request)."""
    return layer.rule == FRAMEWORK and not (layer.on_request and RULES[layer.kind].beats_framework(layer, sizes))


def framework_flops(layer: LayerShape) -> float:
    """Forward FLOPs of a layer whose weight gradients the backward passes compute."""
    return 2.0 * layer.tokens * layer.sizes.get(RULES[layer.kind].matmul_role, 0)


def model_shape(capture: Any, params: Mapping[str, Any], plan: tuple | None) -> ModelShape:
    """The sizes of a captured model (``capture`` may be ``None`` where an adapter cannot
    capture: F is then taken as 2P and activations as √P per example, rough figures).
    ``plan`` is the structured engine's grouping of the capture."""
    sizes = {name: math.prod(p.shape) for name, p in params.items()}
    total = sum(sizes.values())
    if capture is None or plan is None:
        return ModelShape(total, 2.0 * total, max(1, math.isqrt(total)), calls=len(sizes))
    groups, shared, fallback, reasons = plan
    forward, direct_flops, activations = _forward(capture, sizes, fallback)
    used = {name for use in capture.uses for name in use.params.values()}
    forward += 2.0 * sum(n for name, n in sizes.items() if name not in used)  # uncaptured: once each
    direct_flops += 2.0 * sum(sizes[name] for name in fallback if name not in used)
    layers = [group_layer(capture, group, sizes) for group in groups]
    rule = TIED if shared and tied_pairs(shared) is not None else SHARED
    for use in shared:  # a parameter tied across kinds
        tokens, features = token_count(capture.output_shapes[use.key], use.feature_axis)
        roles = _role_sizes(use, sizes)
        layers.append(
            LayerShape(use.layer, use.kind, roles, tokens, features, RULES[use.kind].fan_in(roles, features), rule)
        )
    why = "; ".join(reasons) or "no rule"
    for name in fallback:
        layers.append(LayerShape(name, "parameter", {"": sizes[name]}, 1, 1, 0, f"{FALLBACK}{why}"))
    calls = len(capture.uses) + sum(1 for name in sizes if name not in used)
    return ModelShape(total, forward, activations, tuple(layers), direct_flops, calls=max(calls, 1))
