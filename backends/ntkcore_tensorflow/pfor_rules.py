"""Vectorisation rules that TensorFlow's pfor lacks, installed only while ntkcore vectorises.

Where pfor has no rule for an op's combination of per-example (stacked) and shared inputs, it
runs a ``while_loop`` over the examples: slow to build, slow to run, and not compilable by XLA.
A Keras CNN's per-example gradients and tangents hit four such cases:

- ``Conv2DBackpropFilter`` with a per-example input (every per-example filter gradient): here
  the patches — the input's kh·kw shifted, strided, dilated views side by side — times the
  output gradient, one batched matmul. Slices, padding and matmuls have rules of their own, so a
  map nested around this one vectorises too. (Folding the examples into the channels as a
  grouped convolution is one op, but oneDNN's graph rewrite of the filter gradient ignores
  the groups.)
- ``Conv2D`` with a per-example filter (forward-mode tangents): patches·filter, batched.
- The depthwise convolution and its two gradients, whose rules fold the examples into the
  channels (exact: the channels are independent) but demand that both operands be per-example:
  the shared one is stacked first.

The rules swap TensorFlow's converter registry entries for the duration of a vectorisation and
put the originals back, so the user's own ``tf.vectorized_map`` is left as TensorFlow made it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import tensorflow as tf
from tensorflow.python.ops.parallel_for import pfor as _pfor


def _pads(size: int, out: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) of one spatial axis."""
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _patches(pfor_input: Any, x: Any, kernel: tuple[int, int], out: tuple[int, int]) -> Any:
    """The patches of a (n, B, H, W, C) input for the convolution ``pfor_input`` (its strides,
    dilations and padding; ``kernel`` (kh, kw), ``out`` (H', W')): (n, B·H'·W', kh·kw·C), each
    row ordered (i, j, c) like a filter's (kh, kw, C) — the input's kh·kw shifted, strided,
    dilated views side by side."""
    spatial = (2, 3) if pfor_input.get_attr("data_format") == b"NCHW" else (1, 2)  # of the op's (B, ...) layout
    strides = [pfor_input.get_attr("strides")[a] for a in spatial]
    dilations = [pfor_input.get_attr("dilations")[a] for a in spatial]
    padding = pfor_input.get_attr("padding")
    if padding == b"EXPLICIT":
        explicit = list(pfor_input.get_attr("explicit_paddings"))
        pads = [(explicit[2 * a], explicit[2 * a + 1]) for a in spatial]
    elif padding == b"SAME":
        pads = [_pads(x.shape[2 + a], out[a], kernel[a], strides[a], dilations[a]) for a in (0, 1)]
    else:
        pads = [(0, 0), (0, 0)]
    if any(p for pair in pads for p in pair):
        x = tf.pad(x, [(0, 0), (0, 0), pads[0], pads[1], (0, 0)])
    reach = [(out[a] - 1) * strides[a] + 1 for a in (0, 1)]
    taps = [
        x[:, :, i * dilations[0] : i * dilations[0] + reach[0] : strides[0],
          j * dilations[1] : j * dilations[1] + reach[1] : strides[1], :]
        for i in range(kernel[0])
        for j in range(kernel[1])
    ]  # fmt: skip
    patches = taps[0] if len(taps) == 1 else tf.concat(taps, axis=-1)
    return tf.reshape(patches, (-1, x.shape[1] * out[0] * out[1], kernel[0] * kernel[1] * x.shape[-1]))


def _nhwc(pfor_input: Any, *tensors: Any) -> list[Any]:
    """Stacked (n, B, ...) tensors in the op's data format, channels last."""
    if pfor_input.get_attr("data_format") != b"NCHW":
        return list(tensors)
    return [tf.transpose(t, (0, 1, 3, 4, 2)) for t in tensors]


def _static(*shapes: Any) -> bool:
    return all(s.is_fully_defined() for s in shapes)


def _backprop_filter(pfor_input: Any) -> Any:
    """Per-example ``Conv2DBackpropFilter``: gradients (n, B, H', W', F) and an input (n, B, H,
    W, C) or shared (B, H, W, C) (NCHW: channels before H, W) → (n, kh, kw, C, F) as
    patchesᵀ·gradients, one matmul per example. A shared input gets the same rule, not
    TensorFlow's (one filter gradient of F·n outputs): that op, in a map nested around this
    one, would have no rule again. TensorFlow's own rule where a shape is not static or the
    convolution is grouped."""
    x, stacked, _ = pfor_input.input(0)
    g = pfor_input.stacked_input(2)
    filter_shape = pfor_input.outputs[0].shape
    x = x if stacked else x[None]
    if not _static(filter_shape, x.shape[1:], g.shape[1:]):
        return _ORIGINAL[_FILTER](pfor_input)
    x, g = _nhwc(pfor_input, x, g)
    kh, kw, channels, features = filter_shape.as_list()
    if channels != x.shape[-1]:  # grouped
        return _ORIGINAL[_FILTER](pfor_input)
    patches = _patches(pfor_input, x, (kh, kw), tuple(g.shape[2:4]))  # n, or 1 for a shared input
    grads = tf.reshape(g, (-1, patches.shape[1], features))
    result = tf.matmul(patches, grads, transpose_a=True)  # (n, kh·kw·C, F), broadcast over a shared input
    return _pfor.wrap(tf.reshape(result, (-1, kh, kw, channels, features)), True)


def _depthwise_filter(pfor_input: Any) -> Any:
    """Per-example ``DepthwiseConv2dNativeBackpropFilter`` like :func:`_backprop_filter`, the
    channels kept apart: patches (n, R, kh·kw, C) against gradients (n, R, C, M), R = B·H'·W'.
    (TensorFlow's rule tiles a shared input per example and folds the examples into the
    channels: exact, but its n·C-channel op runs slower than this.)"""
    x, stacked, _ = pfor_input.input(0)
    g = pfor_input.stacked_input(2)
    filter_shape = pfor_input.outputs[0].shape
    x = x if stacked else x[None]
    if not _static(filter_shape, x.shape[1:], g.shape[1:]):
        return _stacking(_DEPTHWISE_FILTER, [0, 2])(pfor_input)
    x, g = _nhwc(pfor_input, x, g)
    kh, kw, channels, multiplier = filter_shape.as_list()
    patches = _patches(pfor_input, x, (kh, kw), tuple(g.shape[2:4]))
    patches = tf.reshape(patches, (-1, patches.shape[1], kh * kw, channels))
    grads = tf.reshape(g, (-1, patches.shape[1], channels, multiplier))
    if not stacked:
        patches = tf.broadcast_to(patches, tf.concat([tf.shape(grads)[:1], tf.shape(patches)[1:]], 0))
    result = tf.einsum("nrtc,nrcm->ntcm", patches, grads)
    return _pfor.wrap(tf.reshape(result, (-1, kh, kw, channels, multiplier)), True)


def _conv(pfor_input: Any) -> Any:
    """``Conv2D`` with a per-example filter (forward-mode tangents of the filter): patches·filter,
    one matmul per example; TensorFlow's own rule (batch folding) for a shared filter."""
    if not pfor_input.input(1)[1]:
        return _ORIGINAL[_CONV](pfor_input)
    x, stacked, _ = pfor_input.input(0)
    w = pfor_input.stacked_input(1)  # (n, kh, kw, C, F)
    out_shape = pfor_input.outputs[0].shape  # (B, H', W', F), or NCHW
    x = x if stacked else x[None]
    nchw = pfor_input.get_attr("data_format") == b"NCHW"
    if not _static(w.shape[1:], x.shape[1:], out_shape) or w.shape[3] != x.shape[2 if nchw else 4]:
        return _ORIGINAL[_CONV](pfor_input)
    (x,) = _nhwc(pfor_input, x)
    _, kh, kw, channels, features = w.shape.as_list()
    batch, out_h, out_w = (out_shape[0], *out_shape[2:4]) if nchw else tuple(out_shape[:3])
    patches = _patches(pfor_input, x, (kh, kw), (out_h, out_w))
    y = tf.matmul(patches, tf.reshape(w, (-1, kh * kw * channels, features)))  # (n, B·H'·W', F)
    y = tf.reshape(y, (-1, batch, out_h, out_w, features))
    return _pfor.wrap(tf.transpose(y, (0, 1, 4, 2, 3)) if nchw else y, True)


def _stacking(op: str, indices: list[int]) -> Callable[[Any], Any]:
    """TensorFlow's rule for ``op``, with the inputs at ``indices`` stacked first: its depthwise
    rules fold the examples into the channels, exact, but demand a per-example filter and input
    and otherwise run a while_loop (a shared filter is only tiled, which costs its size n times)."""

    def rule(pfor_input: Any) -> Any:
        pfor_input.stack_inputs(stack_indices=indices)
        return _ORIGINAL[op](pfor_input)

    return rule


def _batch_folding(op: str, stacked: int, sizes: int | None) -> Callable[[Any], Any]:
    """A depthwise convolution or its input gradient with a shared filter and a per-example
    operand at ``stacked``: the examples folded into the batch, one op (an ``input_sizes``
    operand at ``sizes`` scaled to match); with a per-example filter, :func:`_stacking`'s rule."""
    per_example_filter = _stacking(op, [i for i in range(3 if sizes is not None else 2) if i != sizes])

    def rule(pfor_input: Any) -> Any:
        if pfor_input.input(1)[1]:
            return per_example_filter(pfor_input)
        inputs = [pfor_input.unstacked_input(i) if i != stacked else None for i in range(len(pfor_input.inputs))]
        operand = pfor_input.stacked_input(stacked)
        inputs[stacked] = tf.reshape(operand, tf.concat([[-1], tf.shape(operand)[2:]], 0))
        n = pfor_input.pfor.loop_len_vector
        if sizes is not None:
            inputs[sizes] = inputs[sizes] * tf.concat([n, tf.ones([3], n.dtype)], 0)
        out = _pfor._create_op(op, inputs, [x.dtype for x in pfor_input.outputs], attrs=pfor_input.op.node_def.attr)
        y = out.outputs[0]
        return _pfor.wrap(tf.reshape(y, tf.concat([n, [-1], tf.shape(y)[1:]], 0)), True)

    return rule


_FILTER, _CONV, _DEPTHWISE_FILTER = "Conv2DBackpropFilter", "Conv2D", "DepthwiseConv2dNativeBackpropFilter"
_RULES = {
    _FILTER: _backprop_filter,
    _CONV: _conv,
    "DepthwiseConv2dNative": _batch_folding("DepthwiseConv2dNative", 0, None),
    "DepthwiseConv2dNativeBackpropInput": _batch_folding("DepthwiseConv2dNativeBackpropInput", 2, 0),
    _DEPTHWISE_FILTER: _depthwise_filter,
}
_ORIGINAL = {op: _pfor._pfor_converter_registry[op] for op in _RULES}


@contextmanager
def installed() -> Iterator[None]:
    """The rules above in pfor's registry for the block (re-entrant: nested maps keep them)."""
    registry = _pfor._pfor_converter_registry
    before = {op: registry[op] for op in _RULES}
    registry.update(_RULES)
    try:
        yield
    finally:
        registry.update(before)
