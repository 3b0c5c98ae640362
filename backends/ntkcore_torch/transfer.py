"""A torch model's layers for :func:`ntkcore.transfer`, in module order; torch's layouts are the
canonical ones, so only transformers' ``Conv1D`` (an (in, out) weight) and MultiheadAttention's
packed in-projection are converted."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ntkcore.transfer import TransferError, TransferLayer

from .capture import _BATCH_NORM, _is_hf_conv1d

_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _roles(module: nn.Module) -> tuple[str, dict[str, str]] | None:
    """(kind, canonical role -> attribute) of a module transfer knows, else None."""
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return "dense", {"weight": "weight", "bias": "bias"}
    if isinstance(module, _CONVS):
        return "conv", {"weight": "weight", "bias": "bias"}
    if isinstance(module, nn.Embedding):
        return "embedding", {"table": "weight"}
    if isinstance(module, _BATCH_NORM):
        return "batch_norm", {"scale": "weight", "shift": "bias", "mean": "running_mean", "var": "running_var"}
    if isinstance(module, _NORMS):
        return "norm", {"scale": "weight", "shift": "bias"}
    return None


def _own(module: nn.Module, attr: str) -> torch.Tensor | None:
    value = getattr(module, attr, None)
    return value if isinstance(value, torch.Tensor) else None


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, dict[str, str]]]:
    """(name, module, kind, role -> attribute) of every parameterised module, in module order."""
    for name, module in model.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            yield name, module, "attention", {}  # its out_proj, a Linear, follows as a module of its own
            continue
        found = _roles(module)
        if found is None:
            raise TransferError(
                f"no transfer rule for layer {name or 'model'!r} ({type(module).__name__}); "
                "transfer knows dense, convolution, embedding, normalisation and attention layers"
            )
        kind, roles = found
        yield name, module, kind, {r: a for r, a in roles.items() if _own(module, a) is not None}


def layers(model: Any, params: Any) -> list[TransferLayer]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"a torch model must be an nn.Module, got {type(model).__name__}")
    if params is not None:
        raise TypeError("params= is not used for a torch model: it holds its own weights")
    found = []
    for name, module, kind, roles in _modules(model):
        if kind == "attention":
            q, k, v = (_numpy(w) for w in module.in_proj_weight.chunk(3))
            arrays = {"q": q, "k": k, "v": v}
            if module.in_proj_bias is not None:
                arrays |= dict(zip(("q_bias", "k_bias", "v_bias"), (_numpy(b) for b in module.in_proj_bias.chunk(3))))
            found.append(TransferLayer(name, kind, arrays))
            continue
        arrays = {r: _numpy(_own(module, a)) for r, a in roles.items()}
        if _is_hf_conv1d(module):
            arrays["weight"] = arrays["weight"].T
        found.append(TransferLayer(name, kind, arrays))
    return found


def assign(model: nn.Module, params: Any, values: Mapping[str, Mapping[str, np.ndarray]]) -> nn.Module:
    """Write canonical ``values`` (layer name -> role -> array) into ``model``, in place."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module, kind, roles in _modules(model):
            new = values[name]
            if kind == "attention":
                pieces = [new[r] for r in ("q", "k", "v")]
                _copy(module.in_proj_weight, np.concatenate(pieces))
                if module.in_proj_bias is not None:
                    _copy(module.in_proj_bias, np.concatenate([new[f"{r}_bias"] for r in "qkv"]))
                continue
            for role, attr in roles.items():
                array = new[role].T if role == "weight" and _is_hf_conv1d(modules[name]) else new[role]
                _copy(_own(module, attr), array)
    return model


def _copy(tensor: torch.Tensor, array: np.ndarray) -> None:
    tensor.copy_(torch.as_tensor(np.array(array), dtype=tensor.dtype, device=tensor.device))
