"""``ntkcore.factorize`` for torch: find ``nn.Linear`` layers, swap in ``FactorizedLinear``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .layers import FactorizedLinear


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's ``nn.Linear`` modules by path that may be swapped: running ``Linear``'s own
    forward, not inside a factorized layer, and not an attention's output projection (whose
    weight the attention reads directly)."""
    owned = {id(m) for f in model.modules() if isinstance(f, FactorizedLinear) for m in (f.u, f.v)}
    owned |= {id(a.out_proj) for a in model.modules() if isinstance(a, nn.MultiheadAttention)}
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and id(m) not in owned
    }


def dense_layers(model: Any, params: Any) -> dict[str, tuple[np.ndarray, bool]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params is not None:
        raise ValueError("params= is not used to factorize a torch module: its own weights are factorized")
    return {
        name: (m.weight.detach().cpu().double().numpy().T, m.weight.requires_grad)
        for name, m in _linears(model).items()
    }


def factorized(model: nn.Module, params: Any, factors: Mapping[str, Any]) -> nn.Module:
    out = copy.deepcopy(model)
    linears = _linears(out)
    for name, f in factors.items():
        old = linears[name]
        new = FactorizedLinear(
            old.in_features, old.out_features, f.rank, bias=old.bias is not None,
            dtype=old.weight.dtype, device=old.weight.device,
        )  # fmt: skip
        with torch.no_grad():
            new.u.weight.copy_(torch.from_numpy(f.u.T))
            new.v.weight.copy_(torch.from_numpy(f.v.T))
            if old.bias is not None:
                new.v.bias.copy_(old.bias)
        new.u.weight.requires_grad_(old.weight.requires_grad)
        new.v.weight.requires_grad_(old.weight.requires_grad and f.train_v)
        if old.bias is not None:
            new.v.bias.requires_grad_(old.bias.requires_grad)
        new.train(old.training)
        if not name:  # the model is the layer
            return new
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent), attr, new)
    return out
