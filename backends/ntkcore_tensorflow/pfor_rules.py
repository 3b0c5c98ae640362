"""Vectorisation rules that TensorFlow's pfor lacks, installed only while ntkcore vectorises.

Per-example gradients of a convolution are ``Conv2DBackpropFilter`` with a per-example input;
pfor has no rule for that case and runs a ``while_loop`` over the examples (one per
convolution: much of a Keras CNN's first call, and slow to execute). The rule here writes the
filter gradient as what it is, for all examples at once: the input's kh·kw shifted (strided,
dilated) views side by side — the patches — times the output gradient, one batched matmul.
Slices, padding and matmuls all have pfor rules of their own, so a map nested around this one
vectorises too. (A grouped convolution, the examples folded into the channels, is one op, but
oneDNN's graph rewrite of the filter gradient ignores the groups.)

The rule swaps TensorFlow's converter registry entry for the duration of a vectorisation and
puts the original back, so the user's own ``tf.vectorized_map`` is left as TensorFlow made it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import tensorflow as tf
from tensorflow.python.ops.parallel_for import pfor as _pfor

_OP = "Conv2DBackpropFilter"


def _pads(size: int, out: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) of one spatial axis."""
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


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
    nchw = pfor_input.get_attr("data_format") == b"NCHW"
    static = filter_shape.is_fully_defined() and x.shape[1:].is_fully_defined() and g.shape[1:].is_fully_defined()
    if not static or filter_shape[2] != x.shape[2 if nchw else 4]:
        return _ORIGINAL(pfor_input)
    spatial = (2, 3) if nchw else (1, 2)  # of the op's own (B, ...) layout
    if nchw:
        x, g = tf.transpose(x, (0, 1, 3, 4, 2)), tf.transpose(g, (0, 1, 3, 4, 2))
    strides = [pfor_input.get_attr("strides")[a] for a in spatial]
    dilations = [pfor_input.get_attr("dilations")[a] for a in spatial]
    kh, kw, channels, features = filter_shape.as_list()
    (_, batch, height, width, _), (_, _, out_h, out_w, _) = x.shape.as_list(), g.shape.as_list()
    padding = pfor_input.get_attr("padding")
    if padding == b"EXPLICIT":
        explicit = list(pfor_input.get_attr("explicit_paddings"))
        pads = [(explicit[2 * a], explicit[2 * a + 1]) for a in spatial]
    elif padding == b"SAME":
        pads = [_pads(height, out_h, kh, strides[0], dilations[0]), _pads(width, out_w, kw, strides[1], dilations[1])]
    else:
        pads = [(0, 0), (0, 0)]
    if any(p for pair in pads for p in pair):
        x = tf.pad(x, [(0, 0), (0, 0), pads[0], pads[1], (0, 0)])
    taps = [
        x[
            :,
            :,
            i * dilations[0] : i * dilations[0] + (out_h - 1) * strides[0] + 1 : strides[0],
            j * dilations[1] : j * dilations[1] + (out_w - 1) * strides[1] + 1 : strides[1],
            :,
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = taps[0] if len(taps) == 1 else tf.concat(taps, axis=-1)  # (n, B, H', W', kh·kw·C): (i, j, c)
    rows = batch * out_h * out_w
    patches = tf.reshape(patches, (-1, rows, kh * kw * channels))  # n, or 1 for a shared input
    grads = tf.reshape(g, (-1, rows, features))
    result = tf.matmul(patches, grads, transpose_a=True)  # (n, kh·kw·C, F), broadcast over a shared input
    return _pfor.wrap(tf.reshape(result, (-1, kh, kw, channels, features)), True)


_ORIGINAL = _pfor._pfor_converter_registry[_OP]


@contextmanager
def installed() -> Iterator[None]:
    """The rules above in pfor's registry for the block (re-entrant: nested maps keep them)."""
    registry = _pfor._pfor_converter_registry
    before = registry[_OP]
    registry[_OP] = _backprop_filter
    try:
        yield
    finally:
        registry[_OP] = before
