"""Per-layer capture for structured derivatives on Keras 3 models.

The ``call`` of each layer with a rule (Dense, EinsumDense — so MultiHeadAttention's
projections —, convolutions, Embedding, LayerNormalization, RMSNormalization,
BatchNormalization) is wrapped for the duration of a forward pass: the wrapper records the
structured input and adds the probe to the layer's pre-activation output. A normalisation's
x̂ is the layer's own output with γ = 1 and β = 0, so it follows Keras' semantics exactly.
Convolutions are differentiated by TensorFlow itself, in the same backward passes that give
the cotangents (faster than patches and a matmul), except where the conv rule's pairwise order
is cheaper: their patches are then formed on request (:mod:`.patches`).
A discovery pass reads every trainable variable through an auditing ``StatelessScope``: a
variable read outside its own layer's call (tied weights) is excluded, so an unseen use never
gives a wrong number. Everything else (other layers, a ``tf.Module``) takes the exact
per-layer fallback.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from ntkcore.adapter import CallRecorder, LayerEntry, ParameterAudit, Patches, build_capture, owners_of, patched
from ntkcore.protocol import Capture, PreparedModel

from . import patches as conv_patches


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


def _table(keras: Any, model: Any, name_of: Mapping[int, str]) -> tuple[dict, dict[str, LayerEntry], dict, list]:
    """(path -> layer, path -> its rule's entry, path -> role -> variable, layers without a rule);
    ``name_of`` maps θ's variables (by id) to their names in the parameter map."""
    layers, table, variables = {}, {}, {}
    for layer in _sublayers(model):
        rule = _rule(keras, layer)
        if rule is None:
            continue
        kind, role_variables, axis = rule
        role_variables = {r: v for r, v in role_variables.items() if v is not None and id(v) in name_of}
        if role_variables:
            path = layer.path if hasattr(layer, "path") else layer.name
            layers[path], variables[path] = layer, role_variables
            count = conv_patches.groups(layer) if kind == "conv" else 1
            table[path] = LayerEntry(
                kind, {role: name_of[id(v)] for role, v in role_variables.items()}, axis, True, count
            )
    covered = {name for entry in table.values() for name in entry.roles.values()}
    theta = {id(v): v for v in model.variables}
    unsupported = sorted({theta[i].path.rpartition("/")[0] for i, name in name_of.items() if name not in covered})
    return layers, table, variables, unsupported


def _without_activation(layer: Any, original: Callable, inputs: Any, args: tuple, kwargs: dict) -> Any:
    """The layer's pre-activation output (the probe goes before the activation)."""
    activation, layer.activation = layer.activation, None
    try:
        return original(inputs, *args, **kwargs)
    finally:
        layer.activation = activation


def _dense_call(keras: Any, layer: Any, original: Callable, recorder: CallRecorder, key: str, call: tuple) -> Any:
    """A dense layer with its contracted axes and output features flattened for the rule."""
    inputs, args, kwargs = call
    out = _without_activation(layer, original, inputs, args, kwargs)
    contracted = _einsum_contracted(layer) if type(layer) is keras.layers.EinsumDense else 1
    free = len(inputs.shape) - contracted
    native = _shape(out)
    out = recorder.record(key, _flatten_from(inputs, free), _flatten_from(out, free))
    return layer.activation(tf.reshape(out, native))


def _affine_call(keras: Any, roles: dict, original: Callable, recorder: CallRecorder, key: str, call: tuple) -> Any:
    """A normalisation: x̂ is the layer's own output with scale 1 and shift 0."""
    inputs, args, kwargs = call
    out = original(inputs, *args, **kwargs)
    unit = [(v, (tf.ones_like if role == "scale" else tf.zeros_like)(v.value)) for role, v in roles.items()]
    with keras.StatelessScope(state_mapping=unit):
        normalised = original(inputs, *args, **kwargs)
    return recorder.record(key, normalised, out)


def _wrap(
    keras: Any, layer: Any, path: str, entry: LayerEntry, roles: dict, recorder: CallRecorder, audit: Any
) -> Callable:
    """The layer's ``call`` that records the call (structured input, probe) for the rule."""
    original = layer.call

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        key = recorder.next_key(path)
        audit.entered(path)
        try:
            if entry.kind == "dense":
                return _dense_call(keras, layer, original, recorder, key, (inputs, args, kwargs))
            if entry.kind == "conv":  # differentiated by TensorFlow, or patches formed on request
                out = _without_activation(layer, original, inputs, args, kwargs)
                return layer.activation(recorder.record(key, inputs, out))
            if entry.kind == "embedding":
                return recorder.record(key, tf.cast(inputs, tf.int64), original(inputs, *args, **kwargs))
            return _affine_call(keras, roles, original, recorder, key, (inputs, args, kwargs))
        finally:
            audit.left()

    return call


def _run(
    keras: Any, found: tuple, forward: Callable, p: Mapping[str, Any], batch: Any, recorder: Any, audit: Any
) -> Any:
    """``forward(p, batch)`` with every layer of the table wrapped."""
    layers, table, variables, _ = found

    def install(patches: Patches) -> None:
        for path, layer in layers.items():
            patches.set(layer, "call", _wrap(keras, layer, path, table[path], variables[path], recorder, audit))

    with patched(install):
        return forward(p, batch)


def capture(prepared: PreparedModel, x: Any) -> Capture:
    """Capture a Keras model (run as ``prepared.apply``) on a batch of one ``x``."""
    model, params, apply = prepared.source, prepared.params, prepared.apply
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.Layer):
        return Capture((), lambda p, probes, batch: (apply(p, batch), {}), {}, (f"{type(model).__name__} (tf.Module)",))
    name_of = {id(v): name for name, v in zip(params, prepared.handles)}  # θ's variables: trainable= chooses
    found = _table(keras, model, name_of)
    audit, recorder = ParameterAudit(owners_of(found[1])), CallRecorder()

    read = keras.StatelessScope.get_current_value

    def get_current_value(scope: Any, variable: Any) -> Any:  # discovery: which layer reads each variable
        if id(variable) in name_of:
            audit.used(name_of[id(variable)])
        return read(scope, variable)

    def audited(p: Mapping[str, Any], batch: Any) -> Any:  # ``apply`` itself: model_kwargs= and output= too
        with patched(lambda patches: patches.set(keras.StatelessScope, "get_current_value", get_current_value)):
            return apply(p, batch)

    _run(keras, found, audited, params, x, recorder, audit)

    def apply_probed(p: Mapping[str, Any], probes: Mapping[str, Any], batch: Any) -> tuple:
        probed = CallRecorder(probes)
        return _run(keras, found, apply, p, batch, probed, ParameterAudit({})), probed.inputs

    return build_capture(
        found[1],
        recorder.shapes,
        apply_probed,
        unsupported=tuple(found[3]),
        excluded=audit.excluded("is also read outside its layer"),
        framework_gradients=frozenset({"conv"}),  # TensorFlow's backward beats patches and a matmul
        deferred_inputs={
            path: functools.partial(conv_patches.patches, layer)
            for path, layer in found[0].items()
            if found[1][path].kind == "conv" and conv_patches.formable(layer)
        },
    )
