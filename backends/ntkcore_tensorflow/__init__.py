"""TensorFlow adapter: Keras 3 models and layers (TensorFlow backend) and ``tf.Module``.

θ is the model's ``trainable_variables``; everything else (BatchNormalization moving
statistics, layers with ``trainable=False``) is a constant. Keras models run in inference
mode (``training=False``) inside a ``keras.StatelessScope`` that maps each trainable
variable to the value in the parameter map, so ``apply`` is a pure function of that map.
A ``tf.Module`` has no such hook: its parameter map holds its own variables, which the
autodiff functions watch directly.

jvp is ``tf.autodiff.ForwardAccumulator``, vjp a persistent ``tf.GradientTape``, vmap
``tf.vectorized_map`` (pfor with the rules of :mod:`.pfor_rules`, and the while-loop fallback for
any op it still cannot vectorise)
and jit ``tf.function``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import tensorflow as tf

from ntkcore.adapter import Adapter, ApplyCache, replaced_params
from ntkcore.protocol import PreparedModel

from . import pfor_rules
from . import xp as _xp
from .layers import FactorizedDense

__all__ = ["FactorizedDense", "TensorFlowBackend"]

_ZERO = tf.UnconnectedGradients.ZERO
_NUMPY_LIKE = (np.ndarray, np.generic, list, tuple, float, int)
_APPLY_CACHE = ApplyCache()  # so that repeated ntk() calls reuse compiled kernels


def _keras() -> Any:
    return sys.modules.get("keras")


def _is_keras_layer(model: Any) -> bool:
    layer = getattr(_keras(), "Layer", None)
    return layer is not None and isinstance(model, layer)


def _is_keras_variable(x: Any) -> bool:
    variable = getattr(_keras(), "Variable", None)
    return variable is not None and isinstance(x, variable)


def _unique(names: list[str]) -> list[str]:
    used: set[str] = set()
    out = []
    for name in names:
        candidate, i = name, 0
        while candidate in used:
            i += 1
            candidate = f"{name}_{i}"
        used.add(candidate)
        out.append(candidate)
    return out


def _sublayers(layer: Any) -> list[Any]:
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=True, recursive=True))
    found = [layer]
    for sub in getattr(layer, "layers", []):
        found += _sublayers(sub)
    return found


def _shared(apply: Callable, model: Any, variables: list, names: list[str]) -> Callable:
    """The ``apply`` already made for this model and trainable variables, else ``apply``.

    ``apply`` reads only ``p``, the model and its variables (constants are read live), so one
    per model and variable list lets the core's compiled kernels be reused across ``ntk()`` calls.
    """
    return _APPLY_CACHE.shared((id(model), tuple(map(id, variables)), tuple(names)), apply, model, variables)


def _as_tensor(value: Any) -> Any:
    """A variable's value as a tensor; anything else as it is."""
    return tf.convert_to_tensor(value) if isinstance(value, tf.Variable) or _is_keras_variable(value) else value


def _chosen(model: Any, trainable: Callable[[str], bool] | None, name: Callable[[Any], str]) -> list:
    """θ's variables: the trainable ones, or the floating-point ones ``trainable(name)`` chooses."""
    if trainable is None:
        return list(model.trainable_variables)
    return [v for v in model.variables if tf.as_dtype(v.dtype).is_floating and trainable(name(v))]


def _prepare_keras(
    adapter: Any, model: Any, params: Any, trainable: Callable[[str], bool] | None = None
) -> PreparedModel:
    keras = _keras()
    if keras.backend.backend() != "tensorflow":
        raise TypeError(
            f"the Keras backend is {keras.backend.backend()!r}, but ntkcore's TensorFlow adapter needs "
            "Keras running on TensorFlow: set KERAS_BACKEND=tensorflow before importing keras"
        )
    if not model.built:
        raise ValueError(
            f"Keras model {model.name!r} is not built, so it has no variables yet: give it a "
            "keras.Input or call it once on a batch before computing its kernel"
        )
    variables = _chosen(model, trainable, lambda v: v.path)
    names = _unique([v.path for v in variables])
    values: dict[str, Any] = {name: v.value for name, v in zip(names, variables)}  # live tf.Variables
    if params is not None:
        if not isinstance(params, Mapping):
            raise TypeError(
                "params= for a Keras model must be a mapping name -> array of replacement values for "
                f"its trainable variables, got {type(params).__name__}; names: {names}"
            )
        values = replaced_params(
            values,
            params,
            lambda name, value, own: adapter.replacement(name, _as_tensor(value), own, "variable"),
            lambda unknown: (
                f"params= names {unknown} are not trainable variables of the model; expected some of {names}"
            ),
        )
    kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
    recurrent = [layer for layer in _sublayers(model) if isinstance(layer, keras.layers.RNN)]
    norms = [layer for layer in _sublayers(model) if _over_last_axis(keras, layer)]

    def apply(p: Mapping[str, Any], x: Any, **model_kwargs: Any) -> Any:
        with keras.StatelessScope(state_mapping=[(v, p[name]) for name, v in zip(names, variables)]):
            with _unrolled(recurrent), _plain_layer_norms(norms):
                return model(x, **kwargs, **model_kwargs)

    apply = _shared(apply, model, variables, names)
    embedding = any(isinstance(layer, keras.layers.Embedding) for layer in _sublayers(model))
    return PreparedModel(apply, values, None, lambda x: embedding, source=model, handles=tuple(variables))


@contextmanager
def _unrolled(layers: list) -> Iterator[None]:
    """Recurrent layers run as a Python loop over the time steps: their ``tf.while_loop`` has no
    vectorisation (pfor) or forward-mode rule for the loop's variant state. Same weights, same
    cell formula; the time axis must have a static length."""
    before = [layer.unroll for layer in layers]
    for layer in layers:
        layer.unroll = True
    try:
        yield
    finally:
        for layer, unroll in zip(layers, before):
            layer.unroll = unroll


def _layer_norm_call(layer: Any) -> Callable:
    """``LayerNormalization`` over its last axis by its formula: TensorFlow's ``moments`` stops
    the gradient through the mean, right for first derivatives, wrong for a jvp of a jvp (as
    ``taylor_expand`` takes)."""

    def call(inputs: Any) -> Any:
        x = tf.cast(inputs, layer.compute_dtype)
        if layer.rms_scaling:
            y = x * tf.math.rsqrt(tf.reduce_mean(x * x, axis=-1, keepdims=True) + layer.epsilon)
        else:
            centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
            y = centred * tf.math.rsqrt(tf.reduce_mean(centred * centred, axis=-1, keepdims=True) + layer.epsilon)
        y = y if layer.gamma is None else y * layer.gamma
        return y if layer.beta is None else y + layer.beta

    return call


def _over_last_axis(keras: Any, layer: Any) -> bool:
    """A built ``LayerNormalization`` that normalises the last axis only."""
    if type(layer) is not keras.layers.LayerNormalization or not layer.built:
        return False
    axis = list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    shape = getattr(layer, "_build_shapes_dict", None) or {}
    rank = len(next(iter(shape.values()))) if shape else None
    return axis == [-1] or (rank is not None and axis == [rank - 1])


@contextmanager
def _plain_layer_norms(layers: list) -> Iterator[None]:
    """Last-axis ``LayerNormalization`` layers run by :func:`_layer_norm_call` (one whose call is
    patched already, by the capture, is left as it is)."""
    patched = [layer for layer in layers if "call" not in layer.__dict__]
    for layer in patched:
        layer.call = _layer_norm_call(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.call


def _prepare_module(model: tf.Module, params: Any, trainable: Callable[[str], bool] | None = None) -> PreparedModel:
    if params is not None:
        raise TypeError(
            "params= is not supported for a tf.Module (its variables cannot be substituted); assign the "
            "values to its variables, or pass params=None to use them"
        )
    variables = _chosen(model, trainable, lambda v: v.name.split(":")[0])
    names = _unique([v.name.split(":")[0] for v in variables])

    def apply(p: Mapping[str, Any], x: Any, **model_kwargs: Any) -> Any:
        # p holds the module's own variables (watched by jvp/vjp); the module reads them itself
        return model(x, **model_kwargs)

    apply = _shared(apply, model, variables, names)
    return PreparedModel(apply, dict(zip(names, variables)), None, lambda x: False, source=model)


class TensorFlowBackend(Adapter):
    """Autodiff interface on tf.GradientTape, ForwardAccumulator, vectorized_map, tf.function."""

    name = "tensorflow"
    native = (tf.Tensor,)
    arrays_text, model_text = "a TensorFlow tensor or a numpy array", "TensorFlow/Keras"
    numpy_like = _NUMPY_LIKE

    def owns(self, model: Any, params: Any, arrays: tuple[Any, ...]) -> bool:
        if _is_keras_layer(model) or isinstance(model, tf.Module):
            return True
        try:
            leaves = tf.nest.flatten(params) if params is not None else []
        except Exception:  # a structure tf.nest cannot walk is not ours
            leaves = []
        return any(isinstance(a, (tf.Tensor, tf.Variable)) or _is_keras_variable(a) for a in [*leaves, *arrays])

    def prepare(
        self, model: Any, params: Any, trainable: Callable[[str], bool] | None = None, state: Any = None
    ) -> PreparedModel:
        if state is not None:
            raise TypeError("state= is for a haiku transform_with_state model (JAX); this model holds its own state")
        if _is_keras_layer(model):
            return _prepare_keras(self, model, params, trainable)
        if isinstance(model, tf.Module):
            return _prepare_module(model, params, trainable)
        raise TypeError(
            f"model must be a Keras 3 model/layer or a tf.Module for the TensorFlow backend, got "
            f"{type(model).__module__}.{type(model).__name__}"
        )

    def namespace(self, *arrays: Any) -> Any:
        return _xp

    def asarray(self, x: Any, *, like: Any) -> Any:
        if isinstance(x, tf.Variable) or _is_keras_variable(x):
            return tf.convert_to_tensor(x)
        return super().asarray(x, like=like)

    def cast(self, x: Any, like: Any) -> Any:
        return tf.cast(x, tf.as_dtype(like.dtype))

    def expected_input(self, prepared: PreparedModel) -> str | None:
        shape = getattr(prepared.source, "input_shape", None)  # a built functional/Sequential model
        return None if shape is None else f"the model's input shape is {shape}"

    def from_numpy(self, x: np.ndarray, like: Any, *, cast: bool) -> Any:
        return tf.constant(x, dtype=tf.as_dtype(like.dtype) if cast else None)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x.numpy() if hasattr(x, "numpy") else x)

    def is_floating(self, x: Any) -> bool:
        return bool(tf.as_dtype(x.dtype).is_floating)

    def dtype_name(self, x: Any) -> str:
        return tf.as_dtype(x.dtype).name

    def jvp(self, fn: Callable, primals: Mapping[str, Any], tangents: Mapping[str, Any]) -> tuple[Any, Any]:
        keys = list(primals)
        sources = [primals[k] for k in keys]
        directions = [tf.cast(tangents[k], tf.as_dtype(primals[k].dtype)) for k in keys]
        with tf.autodiff.ForwardAccumulator(sources, directions) as acc:
            out = fn(dict(zip(keys, sources)))
        return out, acc.jvp(out, unconnected_gradients=_ZERO)

    def vjp(self, fn: Callable, primals: Mapping[str, Any]) -> tuple[Any, Callable]:
        keys = list(primals)
        sources = [primals[k] for k in keys]
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(sources)
            out = fn(dict(zip(keys, sources)))

        def pullback(cotangent: Any) -> dict[str, Any]:
            grads = tape.gradient(out, sources, output_gradients=cotangent, unconnected_gradients=_ZERO)
            # an embedding's gradient is IndexedSlices: densify
            return {k: tf.convert_to_tensor(g) for k, g in zip(keys, grads)}

        return out, pullback

    def vmap(self, fn: Callable, in_axes: tuple[int | None, ...], chunk_size: int | None = None) -> Callable:
        mapped = [i for i, axis in enumerate(in_axes) if axis is not None]
        if any(in_axes[i] != 0 for i in mapped) or not mapped:
            raise NotImplementedError(
                f"the TensorFlow adapter maps over axis 0 of at least one argument, got {in_axes}"
            )

        def vectorised(*args: Any) -> Any:
            if len(args) != len(in_axes):
                raise TypeError(f"vmap'd function takes {len(in_axes)} arguments, got {len(args)}")

            def body(elems: tuple) -> Any:
                full = list(args)
                for i, e in zip(mapped, elems):
                    full[i] = e
                return fn(*full)

            elems = tuple(args[i] for i in mapped)
            with pfor_rules.installed():  # rules pfor lacks, for this vectorisation only
                n = tf.nest.flatten(elems)[0].shape[0]
                if n == 0:  # pfor over zero iterations divides by zero (SIGFPE): map one dummy, keep none
                    dummy = tf.nest.map_structure(lambda e: tf.zeros((1, *e.shape[1:]), e.dtype), elems)
                    return tf.nest.map_structure(
                        lambda t: t[:0], tf.vectorized_map(body, dummy, fallback_to_while_loop=True)
                    )
                if chunk_size is None or n is None or n <= chunk_size:
                    return tf.vectorized_map(body, elems, fallback_to_while_loop=True)
                return _chunked_map(body, elems, n, chunk_size)

        return vectorised

    def jit(self, fn: Callable) -> Callable:
        compiled = tf.function(fn, autograph=False)

        def call(*args: Any) -> Any:
            # Grappler divides by the zero length of an empty batch's pfor loops (SIGFPE): run eagerly
            empty = any(isinstance(a, tf.Tensor) and a.shape.rank and a.shape[0] == 0 for a in args)
            return fn(*args) if empty else compiled(*args)

        return call


def _chunked_map(body: Callable, elems: tuple, n: int, size: int) -> Any:
    """``vectorized_map(body, elems)`` over chunks of ``size``, one chunk after another.

    The first chunk is vectorised directly (its outputs give the signature), the other full
    chunks run in a ``tf.map_fn`` loop (one vectorisation, not one per chunk), the remainder
    directly; the results are concatenated.
    """

    def chunk(part: Any) -> Any:
        return tf.vectorized_map(body, part, fallback_to_while_loop=True)  # inside pfor_rules.installed()

    def take(start: int, stop: int) -> Any:
        return tf.nest.map_structure(lambda e: e[start:stop], elems)

    full = n // size * size
    parts = [chunk(take(0, size))]
    if full > size:
        middle = tf.nest.map_structure(
            lambda e: tf.reshape(e, (full // size - 1, size, *e.shape[1:])), take(size, full)
        )
        signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), parts[0])
        looped = tf.map_fn(chunk, middle, fn_output_signature=signature, parallel_iterations=1)
        parts.append(tf.nest.map_structure(lambda t: tf.reshape(t, (-1, *t.shape[2:])), looped))
    if full < n:
        parts.append(chunk(take(full, n)))
    return tf.nest.map_structure(lambda *p: tf.concat(p, 0), *parts)
