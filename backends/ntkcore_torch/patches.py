"""A convolution's input patches, formed on request (``Capture.deferred_inputs``).

torch differentiates its convolutions itself, which beats patches and a matmul for the
per-example gradients; but where a layer's positions are few and its weights many (the deep
layers of a CNN) the conv rule's pairwise order needs no gradient at all, only the patches.
They are formed here, once per batch, from the input the capture recorded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def patches(module: nn.modules.conv._ConvNd, recorded: torch.Tensor) -> torch.Tensor:
    """The input patch of every output position, per group: (N, S, G, K) from the recorded
    inputs (N, 1, C, *spatial), or (N, C, *spatial) for an unbatched call, K laid out as the
    weight's (C/G, *kernel)."""
    n, dims = recorded.shape[0], len(module.kernel_size)
    x = recorded.reshape(-1, *recorded.shape[-(dims + 1) :])
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    for axis, (k, stride, dilation) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + axis, dilation * (k - 1) + 1, stride)  # the window on a new last axis
        x = x[..., ::dilation] if dilation > 1 else x
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # (B, *out, C, *kernel)
    per_group = x.shape[1] // module.groups * x.shape[2 + dims :].numel()
    return x.permute(order).reshape(n, -1, module.groups, per_group)
