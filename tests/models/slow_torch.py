"""A small torch MLP whose forward pass sleeps: long enough jobs to interrupt in the tests of
resumable and distributed kernels (``SLOW_SECONDS`` per forward call)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

SLOW_SECONDS = 0.05


class Slow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = nn.Linear(4, 16, dtype=torch.float64)
        self.b = nn.Linear(16, 2, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLOW_SECONDS)
        return self.b(torch.tanh(self.a(x)))


model = Slow()
x = np.random.default_rng(0).normal(size=(24, 4))
