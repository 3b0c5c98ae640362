"""Structured derivatives (arXiv 2206.08720, section 4).

The adapter's capture gives every parameterised layer call's structured input; one vjp per
output component with respect to zero probes added to the layer outputs gives every layer's
output cotangents g at once (N·O·[FP]), and, in the same backward passes, the per-example
gradients of the parameters that are best differentiated directly (fallbacks, and layers the
adapter leaves to its framework where that is cheaper). The rules in :mod:`ntkcore.rules` then
assemble each layer's contribution without forming ∂y/∂θ. A table tied between embedding and
dense calls takes both rules plus their cross terms (:mod:`ntkcore.rules.tied`); another
parameter shared by layers of different kinds is summed from its calls' per-example gradients
where the adapter gives them in the parameter's own layout. Parameters no rule covers — layers without a rule,
parameters also used outside their layer, other sharing across kinds — take the exact
per-layer path: their own Jacobians (from the same backward passes), contracted. When every
output axis is traced, all of this runs over chunks of outputs and is summed, so that memory
holds N·chunk cotangents, not N·O (as traced Jacobian contraction streams its Jacobians).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from ..arrays import layer_name, layers_of, output_basis, zeros
from ..axes import KernelAxes
from ..contraction import contract_by_layer
from ..model_shape import FALLBACK, FRAMEWORK, SHARED, TIED, ModelShape, by_framework, framework_flops, group_layer
from ..protocol import AutodiffBackend, Capture, LayerUse, Params
from ..rules import RULES
from ..rules.base import per_example_cost
from ..rules.tied import cross
from ..rules.tied import pairs_of as tied_pairs
from ..sizes import CallSizes
from .base import Cost, KernelCall, Method, add_parts
from .jacobian_contraction import output_chunk

# Times each element of a shared parameter's per-example gradients crosses memory: formed, laid
# out as the parameter, summed over its calls, read by the contraction, and a copy on the way
# (measured: 45.6 s for 4.1e9 elements on GPT-2's tied table, 2-core CPU, ~1.7 GB/s, before
# tables tied between embedding and dense calls took the pairwise cross terms of rules.tied).
SHARED_PASSES = 5


class StructuredFallbackWarning(UserWarning):
    """Some parameters are computed by the exact per-layer fallback, not by a structure rule."""


def plan(capture: Capture, params: Params) -> tuple[list[list[LayerUse]], list[LayerUse], list[str], list[str]]:
    """Group the captured calls per parameter set; list what falls back and why.

    Returns (groups, shared, fallback parameter names, reasons). A group is the calls of one
    layer (several when it is applied more than once), all of one kind with the same
    parameters. ``shared`` are the calls that touch a parameter used by layers of different
    kinds, all in their rules' layout (``LayerUse.native_layout``): their per-example
    gradients are summed. Other parameters shared across kinds fall back.
    """

    def signature(use: LayerUse) -> tuple:
        return (use.kind, tuple(sorted(use.params.items())), use.feature_axis)

    by_param: dict[str, list[LayerUse]] = defaultdict(list)
    for use in capture.uses:
        for name in use.params.values():
            by_param[name].append(use)
    rejected: set[str] = set(capture.excluded)
    reasons = [f"{name!r} {why}" for name, why in capture.excluded.items()]
    shared_names: set[str] = set()
    for name, uses in by_param.items():
        if len({signature(u) for u in uses}) > 1 and name not in rejected:
            if all(u.native_layout and RULES[u.kind].native_gradients for u in uses):
                shared_names.add(name)
            else:
                rejected.add(name)
                reasons.append(f"{name!r} is shared by layers {sorted({u.layer for u in uses})} of different kinds")
    shared = [u for u in capture.uses if shared_names & set(u.params.values())]
    if rejected & {name for u in shared for name in u.params.values()}:  # a shared call that cannot be summed
        shared_names.clear()
        rejected |= {name for u in shared for name in u.params.values()}
        shared = []
    groups: dict[tuple, list[LayerUse]] = {}
    for use in capture.uses:
        if use not in shared:
            groups.setdefault(signature(use), []).append(use)
    kept = [g for g in groups.values() if not rejected & set(g[0].params.values())]
    covered = {name for g in kept for name in g[0].params.values()} | {n for u in shared for n in u.params.values()}
    fallback = [name for name in params if name not in covered]
    if capture.unsupported:
        reasons.insert(0, f"no structured rule for layer(s) {list(capture.unsupported)}")
    return kept, shared, fallback, reasons


def _pieces(
    backend: AutodiffBackend,
    capture: Capture,
    params: Params,
    x: Any,
    out_shape: tuple[int, ...],
    direct: list[str],
    needed: set[str],
    components: slice | None = None,
) -> tuple[dict, dict, dict]:
    """Per example: the structured inputs of the ``needed`` calls, the output cotangents g of
    every call, and the Jacobians of the ``direct`` parameters — all from one set of O
    vectorised backward passes, taken with respect to the zero probes and those parameters;
    of the flattened output ``components`` only where that slice is given (``out_shape`` is
    then the chunk's (size,))."""
    xp = backend.namespace(x)
    like = next(iter(params.values()))

    def one_example(x_i: Any) -> tuple[dict, dict, dict]:
        batch = x_i[None, ...]
        still = zeros(xp, capture.output_shapes, like)
        _, inputs = capture.apply_probed(params, still, batch)
        primals = {**{f"probe/{k}": v for k, v in still.items()}, **{f"param/{n}": params[n] for n in direct}}

        def f(primals: dict) -> Any:
            probes = {k: primals[f"probe/{k}"] for k in still}
            return capture.apply_probed({**params, **{n: primals[f"param/{n}"] for n in direct}}, probes, batch)[0]

        out, pullback = backend.vjp(lambda p: f(p)[0, ...], primals)
        basis = output_basis(xp, out)
        cotangents = backend.vmap(pullback, (0,))(basis if components is None else basis[components])
        g = {k: cotangents[f"probe/{k}"] for k in still}
        return {k: inputs[k] for k in needed}, g, {n: cotangents[f"param/{n}"] for n in direct}

    inputs, g, jac = backend.vmap(one_example, (0,))(x)
    return inputs, g, {n: xp.reshape(j, (x.shape[0], *out_shape, -1)) for n, j in jac.items()}


def _formed(capture: Capture, deferred: list[list[LayerUse]], inputs: dict, g: dict, jac: dict) -> tuple:
    """The pieces with the deferred layers' structured inputs formed from what was recorded."""
    for use in (u for group in deferred for u in group):
        inputs[use.key] = capture.deferred_inputs[use.layer](inputs[use.key])
    return inputs, g, jac


def _normalise(xp: Any, use: LayerUse, inputs: Any, cotangents: Any, out_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """g to (N, *out, S, F), features last, and the structured input as the kind's rule wants it."""
    n = inputs.shape[0]
    g = cotangents  # (N, O, 1, ..., F) with the layer output's own layout after (N, O)
    order = None
    if use.feature_axis != -1:
        rank = len(g.shape) - 2
        axis = use.feature_axis % rank
        order = [i for i in range(rank) if i != axis] + [axis]
        g = xp.permute_dims(g, (0, 1, *(2 + i for i in order)))
    features = g.shape[-1]
    tokens = math.prod(g.shape[2:-1])
    g = xp.reshape(g, (n, *out_shape, tokens, features))
    return RULES[use.kind].structured_input(xp, inputs, n, tokens, order), g


def _group_arrays(xp: Any, group: list[LayerUse], inputs: dict, g: dict, out_shape: tuple[int, ...]) -> tuple:
    parts = [_normalise(xp, use, inputs[use.key], g[use.key], out_shape) for use in group]
    if len(parts) == 1:
        return parts[0]
    return xp.concat([p[0] for p in parts], axis=1), xp.concat([p[1] for p in parts], axis=-2)


def _shared_gradients(xp: Any, uses: list[LayerUse], params: Params, inputs: dict, g: dict, out_shape: tuple) -> dict:
    """Per-example gradients ``name -> (N, *out, P)`` summed over the calls of each parameter."""
    total: dict[str, Any] = {}
    for use in uses:
        x, gu = _normalise(xp, use, inputs[use.key], g[use.key], out_shape)
        shapes = {role: tuple(params[name].shape) for role, name in use.params.items()}
        for role, grad in RULES[use.kind].gradients(xp, x, gu, set(use.params), shapes).items():
            name = use.params[role]
            total[name] = grad if name not in total else total[name] + grad
    return total


class _Parts:
    """Layer contributions, summed per layer name (all under one name for the whole kernel)."""

    def __init__(self, xp: Any, axes: KernelAxes, shapes: tuple, layer_of: Callable[[str], str] | None) -> None:
        self.xp, self.axes, self.shapes = xp, axes, shapes
        self.key = layer_of or (lambda name: "")
        self.parts: dict[str, Any] = {}

    def add(self, layer: str, part: Any) -> None:
        self.parts[layer] = part if layer not in self.parts else self.parts[layer] + part

    def contract_by_layer(self, j1: dict, j2: dict) -> None:
        layers = layers_of(j1, self.key)
        for layer, part in contract_by_layer(self.xp, j1, j2, self.axes, *self.shapes, layers).items():
            self.add(layer, part)

    def rule(self, group: list[LayerUse], a1: Any, b1: Any, a2: Any, b2: Any) -> None:
        """The group's rule, applied once per layer its roles belong to."""
        roles: dict[str, set[str]] = defaultdict(set)
        for role, name in group[0].params.items():
            roles[self.key(name)].add(role)
        for layer, chosen in roles.items():
            self.add(layer, RULES[group[0].kind].kernel(self.xp, a1, b1, a2, b2, self.axes, chosen))

    def total(self) -> Any:
        total = None
        for part in self.parts.values():
            total = part if total is None else total + part
        return total


def kernel(
    backend: AutodiffBackend,
    capture: Capture,
    params: Params,
    x1: Any,
    x2: Any,
    axes: KernelAxes,
    out_shape: tuple[int, ...],
    layer_of: Callable[[str], str] | None = None,
) -> Any:
    """The NTK by structured derivatives; ``x2=None`` reuses x1's pieces.

    With ``layer_of`` (parameter name -> layer name), a map layer -> that layer's contribution
    instead of their sum: a rule is applied once per layer its roles belong to.
    """
    planned = plan(capture, params)
    numel = {name: math.prod(p.shape) for name, p in params.items()}
    n2 = None if x2 is None else x2.shape[0]
    outputs = math.prod(out_shape)
    chunk = output_chunk(axes, x1.shape[0] + (n2 or 0), outputs, _per_output(capture, planned, numel))
    if chunk >= outputs:
        return _assembled(backend, capture, params, planned, x1, x2, axes, out_shape, layer_of)
    # every output axis traced: Θ = Σ_o Θ[o, o], summed over chunks of outputs, so that the
    # cotangents held at once are N·chunk·[activations], not N·O·[activations]
    flat = KernelAxes(2, (1,), (0,) if 0 in axes.diagonal else ())
    total = None
    for start in range(0, outputs, chunk):
        part = _assembled(
            backend, capture, params, planned, x1, x2, flat, (min(chunk, outputs - start),), layer_of,
            slice(start, start + chunk),
        )  # fmt: skip
        total = part if total is None else add_parts(total, part)
    return total


def _per_output(capture: Capture, planned: tuple, numel: dict[str, int]) -> int:
    """Elements held per example and output component: every call's cotangent, and the
    Jacobians of the parameters differentiated directly (at most: fallbacks and the kinds the
    framework may differentiate)."""
    groups, _, fallback, _ = planned
    framework = [n for g in groups if g[0].kind in capture.framework_gradients for n in g[0].params.values()]
    return sum(math.prod(s) for s in capture.output_shapes.values()) + sum(numel[n] for n in fallback + framework)


def _assembled(
    backend: AutodiffBackend,
    capture: Capture,
    params: Params,
    planned: tuple,
    x1: Any,
    x2: Any,
    axes: KernelAxes,
    out_shape: tuple[int, ...],
    layer_of: Callable[[str], str] | None,
    components: slice | None = None,
) -> Any:
    """The kernel (or its per-layer parts) of the output ``components`` (all by default)."""
    xp = backend.namespace(x1)
    groups, shared, fallback, _ = planned
    numel = {name: math.prod(p.shape) for name, p in params.items()}
    # fallback parameters, and layers whose per-example gradients the framework computes best
    # at these sizes, are differentiated directly in the backward passes that give the cotangents
    sizes = CallSizes.of(x1.shape[0], None if x2 is None else x2.shape[0], out_shape, axes)
    framework = [by_framework(group_layer(capture, g, numel), sizes) for g in groups]
    direct = fallback + [name for g, f in zip(groups, framework) if f for name in g[0].params.values()]
    deferred = [g for g, f in zip(groups, framework) if not f and g[0].kind in capture.framework_gradients]
    groups = [g for g, f in zip(groups, framework) if not f]
    needed = {use.key for g in groups for use in g} | {use.key for use in shared}

    def pieces(x: Any) -> tuple[dict, dict, dict]:
        return _formed(capture, deferred, *_pieces(backend, capture, params, x, out_shape, direct, needed, components))

    inputs1, g1, jac1 = pieces(x1)
    inputs2, g2, jac2 = (inputs1, g1, jac1) if x2 is None else pieces(x2)
    shape1 = (x1.shape[0], *out_shape)
    parts = _Parts(xp, axes, (shape1, shape1 if x2 is None else (x2.shape[0], *out_shape)), layer_of)
    for group in groups:
        a1, b1 = _group_arrays(xp, group, inputs1, g1, out_shape)
        a2, b2 = (a1, b1) if x2 is None else _group_arrays(xp, group, inputs2, g2, out_shape)
        parts.rule(group, a1, b1, a2, b2)
    tied = tied_pairs(shared) if shared else None
    if shared and tied is None:
        s1 = _shared_gradients(xp, shared, params, inputs1, g1, out_shape)
        s2 = s1 if x2 is None else _shared_gradients(xp, shared, params, inputs2, g2, out_shape)
        parts.contract_by_layer(s1, s2)
    for name, by_kind in (tied or {}).items():  # each use's own rule, then the cross terms
        one = {kind: _group_arrays(xp, uses, inputs1, g1, out_shape) for kind, uses in by_kind.items()}
        two = one if x2 is None else {k: _group_arrays(xp, u, inputs2, g2, out_shape) for k, u in by_kind.items()}
        for kind, uses in by_kind.items():
            parts.rule(uses, *one[kind], *two[kind])
        (x_1, gd1), (ids1, e1) = one["dense"], one["embedding"]
        (x_2, gd2), (ids2, e2) = two["dense"], two["embedding"]
        part = cross(xp, gd1, x_1, ids2, e2, axes, True) + cross(xp, gd2, x_2, ids1, e1, axes, False)
        parts.add(parts.key(name), part)
    if direct:
        parts.contract_by_layer(jac1, jac2)
    return parts.parts if layer_of is not None else parts.total()


def _rule_terms(shape: ModelShape, sizes: CallSizes) -> tuple[float, float, float, float, float]:
    """(contraction FLOPs, largest rule intermediate, all rule intermediates, direct gradients,
    forward FLOPs of the layers the framework differentiates) of the layers; sizes in elements."""
    flops = largest = written = gradients = framework = 0.0
    for layer in shape.layers:
        size = sum(layer.sizes.values())
        if layer.rule == FRAMEWORK and by_framework(layer, sizes):
            cost, elements = 2.0 * sizes.pairs * size, 0.0
            gradients += sizes.nx * sizes.outputs * size
            framework += framework_flops(layer)
        elif layer.rule in RULES or layer.rule == FRAMEWORK:  # a framework layer its rule takes at these sizes
            cost, elements = RULES[layer.kind].cost(layer, sizes)
        elif layer.rule == TIED:  # the call's own rule; a dense call adds the two cross terms
            cost, elements = RULES[layer.kind].cost(layer, sizes)
            if layer.kind == "dense":  # Σ_{s,t} over its tokens and the embedding's (taken alike)
                cost += 4.0 * sizes.pairs * layer.tokens**2
                elements = max(elements, float(sizes.pairs * layer.tokens**2))
        elif layer.rule == SHARED:  # per-example gradients, summed, then contracted
            cost, elements = per_example_cost(layer.tokens, size, sizes)
            written += (SHARED_PASSES - 1) * elements
        else:  # fallbacks: contracted with the direct Jacobians
            cost, elements = 2.0 * sizes.pairs * size, 0.0
            gradients += sizes.nx * sizes.outputs * size
        flops += cost
        largest = max(largest, elements)
        written += elements
    return flops, largest, written, gradients, framework


class StructuredDerivatives(Method):
    name = "structured"
    label = "SD"
    title = "structured derivatives"
    uses_capture = True
    batch_coupled = False

    def kernel(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> Any:
        return kernel(call.backend, call.capture, params, x1, x2, call.axes, call.out_shape)

    def per_layer(self, call: KernelCall, params: Params, x1: Any, x2: Any, layers: Any) -> dict[str, Any]:
        """From the same pieces as the whole kernel."""
        parts = kernel(call.backend, call.capture, params, x1, x2, call.axes, call.out_shape, layer_of=layer_name)
        return {layer: parts[layer] for layer in layers}

    def cost(self, shape: ModelShape, sizes: CallSizes, itemsize: int) -> Cost:
        """N·(F + O·F) for the cotangents (input cotangents only), N·O·F_d more for the weight
        gradients of parameters differentiated directly (fallbacks, kinds the framework
        differentiates; F_d their layers' forward FLOPs), then each layer's rule and the
        contraction of the direct ones. With every output axis traced, the cotangents, rule
        intermediates and direct gradients are held for one chunk of outputs at a time."""
        nx, o, a = sizes.nx, sizes.outputs, shape.activations
        contraction, largest, written, gradients, framework = _rule_terms(shape, sizes)
        passes = nx * (shape.forward_flops + o * shape.forward_flops) + nx * o * (shape.direct_flops + framework)
        held = output_chunk(sizes.axes, nx, o, a + round(gradients / max(nx * o, 1))) / o  # traced: chunks
        peak = held * (nx * o * a + largest + gradients) + nx * a + sizes.entries
        traffic = nx * o * a + nx * a + written + gradients + sizes.entries
        return Cost(passes, contraction, peak, traffic)


def describe(layer: Any, sizes: CallSizes) -> str:
    """How structured derivatives treat a captured layer (:class:`~ntkcore.model_shape.LayerShape`)."""
    if layer.rule == FRAMEWORK and by_framework(layer, sizes):
        return f"{layer.kind}: per-example gradients from the framework's backward pass"
    if layer.rule == FRAMEWORK:
        return RULES[layer.kind].describe(layer, sizes) + " (its input formed on request)"
    if layer.rule == TIED:
        return f"{RULES[layer.kind].describe(layer, sizes)}, plus the cross terms of the table it ties to another kind"
    if layer.rule == SHARED:
        return f"{layer.kind} rule's per-example gradients, summed over the layers sharing the parameter"
    if layer.rule.startswith(FALLBACK):
        return "exact per-layer Jacobian contraction (" + layer.rule.removeprefix(FALLBACK) + ")"
    return RULES[layer.rule].describe(layer, sizes)


METHOD = StructuredDerivatives()
