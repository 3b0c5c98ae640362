"""A Keras convolution's input patches, formed on request (``Capture.deferred_inputs``).

TensorFlow differentiates convolutions itself, which beats patches and a matmul for the
per-example gradients; where a layer's positions are few and its weights many (the deep layers
of a CNN) the conv rule's pairwise order needs no gradient, only the patches, formed here once
per batch from the input the capture recorded.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf


def groups(layer: Any) -> int:
    """The layer's groups: a depthwise convolution's are its input channels."""
    return int(layer.kernel.shape[-2]) if not hasattr(layer, "groups") else int(layer.groups)


def formable(layer: Any) -> bool:
    """Patches TensorFlow can extract: channels last, and no dilation in 3D."""
    dilated = any(d != 1 for d in layer.dilation_rate)
    return layer.data_format == "channels_last" and not (len(layer.kernel_size) == 3 and dilated)


def patches(layer: Any, recorded: Any) -> Any:
    """The input patch of every output position, per group: (N, S, G, K) from the recorded
    inputs (N, 1, *spatial, C), K laid out as (kernel positions, channels of the group)."""
    kernel, strides, rates = list(layer.kernel_size), list(layer.strides), list(layer.dilation_rate)
    dims, n = len(kernel), recorded.shape[0]
    x = tf.reshape(recorded, (-1, *recorded.shape[-(dims + 1) :]))
    padding = layer.padding.upper()
    if padding == "CAUSAL":  # Conv1D: the left padding that makes the output causal
        x = tf.pad(x, [[0, 0], [rates[0] * (kernel[0] - 1), 0], [0, 0]])
        padding = "VALID"
    if dims == 1:
        x, kernel, strides, rates = x[:, None], [1, *kernel], [1, *strides], [1, *rates]
    if dims == 3:
        found = tf.extract_volume_patches(x, [1, *kernel, 1], [1, *strides, 1], padding)
    else:
        found = tf.image.extract_patches(x, [1, *kernel, 1], [1, *strides, 1], [1, *rates, 1], padding)
    channels, count = int(x.shape[-1]), groups(layer)
    found = tf.reshape(found, (n, -1, math.prod(kernel), count, channels // count))
    return tf.reshape(tf.transpose(found, (0, 1, 3, 2, 4)), (n, -1, count, math.prod(kernel) * channels // count))
