"""ntkcore's layers for PyTorch models."""

from __future__ import annotations

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """A low-rank dense layer y = x·U·V + b (arXiv 2210.04807), W = U·V of rank ``rank``.

    Built from two ``nn.Linear`` (``u``: in → rank, no bias; ``v``: rank → out), so structured
    derivatives treat it as two chained dense pieces and its cost scales with the rank. A rank of
    min(in, out) or more is full rank (``ntkcore.factorize`` with a fixed V goes up to out).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.u = nn.Linear(in_features, rank, bias=False, **factory)
        self.v = nn.Linear(rank, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.u(x))
