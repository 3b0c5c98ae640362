"""Per-layer capture for structured derivatives on Keras 3 models.

The ``call`` of each layer with a rule (Dense, EinsumDense — so MultiHeadAttention's
projections —, convolutions, Embedding, LayerNormalization, RMSNormalization,
BatchNormalization) is wrapped for the duration of a forward pass: the wrapper records the
structured input and adds the probe to the layer's pre-activation output. A normalisation's
x̂ is the layer's own output with γ = 1 and β = 0, so it follows Keras' semantics exactly.
Convolutions are differentiated by TensorFlow itself, in the same backward passes that give
the cotangents (faster than any patch extraction here).
A discovery pass reads every trainable variable through an auditing ``StatelessScope``: a
variable read outside its own layer's call (tied weights) is excluded, so an unseen use never
gives a wrong number. Everything else (other layers, a ``tf.Module``) takes the exact
per-layer fallback.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from ntkcore.protocol import Capture, LayerUse


def _rule(keras: Any, layer: Any) -> tuple[str, dict[str, Any], int] | None:
    """(kind, role -> variable, feature axis) for a layer with a structure rule, else None."""
    layers = keras.layers
    plain = not getattr(layer, "lora_enabled", False) and getattr(layer, "quantization_mode", None) is None
    if type(layer) is layers.Dense and plain:
        return "dense", {"weight": layer.kernel, "bias": layer.bias}, -1
    if type(layer) is layers.EinsumDense and plain and _einsum_contracted(layer) is not None:
        bias = layer.bias if layer.bias_axes == _einsum_outputs(layer) else None  # else: fallback
        return "dense", {"weight": layer.kernel, "bias": bias}, -1
    if type(layer) in (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.DepthwiseConv2D) and plain:
        return "conv", {"weight": layer.kernel, "bias": layer.bias}, -1  # differentiated by TensorFlow
    if _is(layer, layers.Embedding) and plain:
        return "embedding", {"table": layer.embeddings}, -1
    if _is(layer, layers.LayerNormalization) and _last_axis_only(layer):
        return "affine", {"scale": layer.gamma, "shift": layer.beta}, -1
    if _is(layer, getattr(layers, "RMSNormalization", type(None))) and _last_axis_only(layer):
        return "affine", {"scale": layer.scale}, -1
    if _is(layer, layers.BatchNormalization) and isinstance(layer.axis, int):
        return "affine", {"scale": layer.gamma, "shift": layer.beta}, layer.axis
    return None


def _is(layer: Any, cls: type) -> bool:
    """An instance of ``cls`` that runs ``cls``'s own call (a reversible embedding, say, does not)."""
    return isinstance(layer, cls) and type(layer).call is cls.call


def _einsum_parts(layer: Any) -> tuple[str, str, str] | None:
    match = re.fullmatch(r"((?:\.\.\.)?[a-z]*),([a-z]+)->((?:\.\.\.)?[a-z]*)", layer.equation.replace(" ", ""))
    return None if match is None else match.groups()


def _einsum_outputs(layer: Any) -> str | None:
    """The kernel axes an EinsumDense keeps (its output features), in kernel order."""
    parts = _einsum_parts(layer)
    return None if parts is None else "".join(c for c in parts[1] if c in parts[2])


def _einsum_contracted(layer: Any) -> int | None:
    """How many trailing input axes an EinsumDense contracts, when it is a dense layer on
    flattened axes — input = free + contracted, kernel = contracted + kept, output = free +
    kept, in that order (``abc,cde->abde``, ``abcd,cde->abe``, ``...b,bc->...c``) — else None."""
    parts = _einsum_parts(layer)
    if parts is None:
        return None
    x, kernel, output = parts
    kept = _einsum_outputs(layer)
    contracted = kernel[: len(kernel) - len(kept)]
    free = x[: len(x) - len(contracted)]
    plain = len(set(kernel)) == len(kernel) and not set(free) & set(kernel)
    ok = plain and kernel == contracted + kept and x.endswith(contracted) and output == free + kept
    return len(contracted) if ok else None


def _shape(t: Any) -> list:
    """``t``'s shape, static where known."""
    dynamic = tf.shape(t)
    return [dynamic[i] if n is None else n for i, n in enumerate(t.shape)]


def _flatten_from(t: Any, axis: int) -> tf.Tensor:
    return tf.reshape(t, (*_shape(t)[:axis], -1))


def _last_axis_only(layer: Any) -> bool:
    """Whether a normalisation layer normalises (and scales) the last axis alone."""
    axis = list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if axis == [-1]:
        return True
    try:
        return axis == [len(layer.input.shape) - 1]
    except (AttributeError, ValueError):  # no single input node to read the rank from
        return False


def _sublayers(layer: Any) -> list[Any]:
    return list(layer._flatten_layers(include_self=True, recursive=True))


def capture(model: Any, params: Mapping[str, Any], apply: Callable, x: Any) -> Capture:
    """Capture a Keras model (run as ``apply(params, x)``) on a batch of one ``x``."""
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.Layer):
        return Capture((), lambda p, probes, batch: (apply(p, batch), {}), {}, (f"{type(model).__name__} (tf.Module)",))
    variables = list(model.trainable_variables)
    name_of = {id(v): name for name, v in zip(params, variables)}
    supported: dict[int, tuple[Any, str, str, dict[str, str], int]] = {}
    variables_of: dict[int, dict[str, Any]] = {}
    for layer in _sublayers(model):
        rule = _rule(keras, layer)
        if rule is None:
            continue
        kind, role_variables, axis = rule
        role_variables = {r: v for r, v in role_variables.items() if v is not None and id(v) in name_of}
        if role_variables:
            roles = {role: name_of[id(v)] for role, v in role_variables.items()}
            supported[id(layer)] = (layer, layer.path if hasattr(layer, "path") else layer.name, kind, roles, axis)
            variables_of[id(layer)] = role_variables
    covered = {name for *_, roles, _ in supported.values() for name in roles.values()}
    unsupported = sorted({v.path.rpartition("/")[0] for name, v in zip(params, variables) if name not in covered})

    def run(forward: Callable, p: Mapping[str, Any], batch: Any, probes: Mapping | None, audit: list | None) -> tuple:
        counters: dict[str, int] = defaultdict(int)
        inputs: dict[str, Any] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        originals = {}

        def wrap(layer: Any, path: str, kind: str, role_variables: dict[str, Any]) -> Callable:
            original = layer.call

            def call(inputs_: Any, *args: Any, **kwargs: Any) -> Any:
                key = f"{path}#{counters[path]}"
                counters[path] += 1
                if audit is not None:
                    audit.append(path)
                try:
                    if kind in ("dense", "conv"):
                        activation, layer.activation = layer.activation, None
                        try:
                            out = original(inputs_, *args, **kwargs)
                        finally:
                            layer.activation = activation
                        if kind == "dense":  # contracted axes and output features flattened
                            contracted = _einsum_contracted(layer) if type(layer) is keras.layers.EinsumDense else 1
                            free = len(inputs_.shape) - contracted
                            inputs[key], native = _flatten_from(inputs_, free), _shape(out)
                            out = _flatten_from(out, free)
                    elif kind == "embedding":
                        out = original(inputs_, *args, **kwargs)
                        inputs[key] = tf.cast(inputs_, tf.int64)
                    else:
                        out = original(inputs_, *args, **kwargs)
                        # x̂ is the layer's own output with scale 1 and shift 0
                        unit = [
                            (v, (tf.ones_like if role == "scale" else tf.zeros_like)(v.value))
                            for role, v in role_variables.items()
                        ]
                        with keras.StatelessScope(state_mapping=unit):
                            inputs[key] = original(inputs_, *args, **kwargs)
                finally:
                    if audit is not None:
                        audit.pop()
                shapes[key] = tuple(out.shape)
                if probes is not None:
                    out = out + probes[key]
                if kind == "dense":
                    out = tf.reshape(out, native)
                return layer.activation(out) if kind in ("dense", "conv") else out

            return call

        for layer, path, kind, _, _ in supported.values():
            originals[id(layer)] = layer.__dict__.get("call")
            layer.call = wrap(layer, path, kind, variables_of[id(layer)])
        try:
            out = forward(p, batch)
        finally:
            for layer, *_ in supported.values():
                if originals[id(layer)] is None:
                    del layer.call
                else:
                    layer.call = originals[id(layer)]
        return out, inputs, shapes

    # discovery, auditing which layer reads each trainable variable
    owner = {
        id(v): path
        for layer, path, _, roles, _ in supported.values()
        for v in variables
        if name_of[id(v)] in roles.values()
    }
    active: list[str] = []
    outside: set[str] = set()
    mapping = [(v, params[name_of[id(v)]]) for v in variables]

    class Audit(keras.StatelessScope):
        def get_current_value(self, variable: Any) -> Any:
            path = owner.get(id(variable))
            if path is not None and (not active or active[-1] != path):
                outside.add(name_of[id(variable)])
            return super().get_current_value(variable)

    def audited(p: Mapping[str, Any], batch: Any) -> Any:
        with Audit(state_mapping=mapping):
            return model(batch, training=False)

    _, _, shapes = run(audited, params, x, None, active)
    by_path = {path: (kind, roles, axis) for _, path, kind, roles, axis in supported.values()}
    uses = tuple(LayerUse(key, key.rpartition("#")[0], *by_path[key.rpartition("#")[0]]) for key in shapes)

    def apply_probed(p: Mapping[str, Any], probes: Mapping[str, Any], batch: Any) -> tuple:
        out, inputs, _ = run(apply, p, batch, probes, None)
        return out, inputs

    excluded = {name: "is also read outside its layer" for name in sorted(outside)}
    return Capture(uses, apply_probed, shapes, tuple(unsupported), excluded, frozenset({"conv"}))
