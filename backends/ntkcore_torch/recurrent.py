"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` by their written-out cell formulas, with the module's
own weights: torch's fused kernels have no batching rule (vmap) and no forward-mode AD in
float64. Each direction of each layer is one cell applied at every time step; its input
projection x·W_ihᵀ covers all steps at once and its hidden projection h·W_hhᵀ is applied step by
step, which is what the layer capture records (dense layers; the shared weights make the cross
terms over steps exact). Packed sequences run the module's own forward."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
# (sub-layer, its input, the projection to compute) -> the projection's output (probed during capture)
Record = Callable[[str, torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


def recurrent_modules(model: nn.Module) -> list[nn.Module]:
    """The recurrent layers whose forward :func:`written_out` replaces (torch's own classes)."""
    return [m for m in model.modules() if type(m) in RECURRENT]


def sublayers(module: nn.Module) -> dict[str, dict[str, str]]:
    """Sub-layer (``ih_l0``, ``hh_l0_reverse``, …) -> role -> the module's attribute: the dense
    projections the cells apply."""
    found = {}
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse") if module.bidirectional else ("",):
            for kind in ("ih", "hh"):
                name = f"{kind}_l{layer}{suffix}"
                roles = {"weight": f"weight_{name}"}
                if module.bias:
                    roles["bias"] = f"bias_{name}"
                found[name] = roles
    return found


def _project(module: nn.Module, name: str, x: torch.Tensor, record: Record) -> torch.Tensor:
    bias = getattr(module, f"bias_{name}") if module.bias else None
    return record(name, x, lambda: F.linear(x, getattr(module, f"weight_{name}"), bias))


def _step(module: nn.Module, gates_x: torch.Tensor, state: tuple, name: str, record: Record) -> tuple:
    """One time step of the cell: ``gates_x`` is x_t·W_ihᵀ + b_ih; returns the new state."""
    h = state[0]
    gates_h = _project(module, f"hh_{name}", h[:, None, :], record)[:, 0, :]
    if isinstance(module, nn.LSTM):
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if module.proj_size:
            h = F.linear(h, getattr(module, f"weight_hr_{name}"))
        return h, c
    if isinstance(module, nn.GRU):
        xr, xz, xn = gates_x.chunk(3, dim=-1)
        hr, hz, hn = gates_h.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return ((1 - z) * n + z * h,)
    activation = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return (activation(gates_x + gates_h),)


def _direction(module: nn.Module, x: torch.Tensor, state: tuple, name: str, reverse: bool, record: Record) -> tuple:
    """One direction of one layer over the sequence x (N, L, F): (outputs (N, L, H), last state)."""
    gates = _project(module, f"ih_{name}", x, record)  # every step at once
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    outputs = [None] * x.shape[1]
    for t in steps:
        state = _step(module, gates[:, t, :], state, name, record)
        outputs[t] = state[0]
    return torch.stack(outputs, dim=1), state


def _initial(module: nn.Module, hx: Any, n: int, like: torch.Tensor) -> list[tuple]:
    """Per layer and direction, the initial state (h, c for an LSTM), from ``hx`` or zeros."""
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    if hx is None:
        h0 = like.new_zeros(module.num_layers * directions, n, out_size)
        hx = (
            (h0, like.new_zeros(module.num_layers * directions, n, module.hidden_size))
            if isinstance(module, nn.LSTM)
            else h0
        )
    parts = hx if isinstance(hx, tuple) else (hx,)
    return [tuple(p[i] for p in parts) for i in range(module.num_layers * directions)]


def forward(module: nn.Module, record: Record, input: Any, hx: Any = None) -> tuple:
    """``module.forward`` written out (same signature and outputs)."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        return type(module).forward(module, input, hx)
    batched = input.dim() == 3
    x = input if not batched else input if module.batch_first else input.transpose(0, 1)
    x = x if batched else x.unsqueeze(0)
    if hx is not None and not batched:
        hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    states = _initial(module, hx, x.shape[0], x)
    finals = []
    for layer in range(module.num_layers):
        outputs = []
        for d, suffix in enumerate(("", "_reverse") if module.bidirectional else ("",)):
            index = layer * (2 if module.bidirectional else 1) + d
            out, state = _direction(module, x, states[index], f"l{layer}{suffix}", d == 1, record)
            outputs.append(out)
            finals.append(state)
        x = torch.cat(outputs, dim=-1)  # dropout between layers: none in eval mode
    output = x if not batched else x if module.batch_first else x.transpose(0, 1)
    output = output if batched else output.squeeze(0)
    last = tuple(torch.stack([s[i] for s in finals], dim=0) for i in range(len(finals[0])))
    last = tuple(h if batched else h.squeeze(1) for h in last)
    return output, (last if isinstance(module, nn.LSTM) else last[0])


@contextmanager
def written_out(modules: list[nn.Module]) -> Iterator[None]:
    """Run these modules by :func:`forward` (those whose forward capture has not already patched)."""
    patched = [m for m in modules if "forward" not in m.__dict__]
    for module in patched:
        module.forward = functools.partial(forward, module, lambda name, x, compute: compute())
    try:
        yield
    finally:
        for module in patched:
            del module.forward
