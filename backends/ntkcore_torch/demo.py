"""The demo's MLP in PyTorch, built from numpy weights (see ``ntkcore demo``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def build_mlp(weights: list[tuple[np.ndarray, np.ndarray]], dtype: str) -> tuple[Any, dict[str, Any]]:
    """``nn.Sequential`` of Linear + ReLU; weights are (in, out) matrices and biases."""
    layers: list[nn.Module] = []
    for w, b in weights:
        linear = nn.Linear(*w.shape, dtype=getattr(torch, dtype))
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(w.T))
            linear.bias.copy_(torch.as_tensor(b))
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval(), {}
