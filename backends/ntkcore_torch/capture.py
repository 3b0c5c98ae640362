"""Per-layer capture for structured derivatives: forward hooks on the layers that have rules.

A discovery pass on a batch of one records, under a ``TorchFunctionMode``, every call of a
supported layer (its output shape) and every use of a trainable parameter outside its own
layer's call (tied weights, ``F.linear(x, other.weight)``, MultiheadAttention's projections):
those parameters go to the exact fallback, so a hook that cannot see a use never gives a
wrong number.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ntkcore.protocol import Capture, LayerUse

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


def _rule(module: nn.Module) -> tuple[str, dict[str, str], int] | None:
    """(kind, role -> attribute, feature axis) for a module with a structure rule, else None."""
    if isinstance(module, nn.Linear):
        return "dense", {"weight": "weight", "bias": "bias"}, -1
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode == "zeros":
        return "conv", {"weight": "weight", "bias": "bias"}, 1
    if isinstance(module, nn.Embedding) and module.padding_idx is None and module.max_norm is None:
        if not module.scale_grad_by_freq:
            return "embedding", {"table": "weight"}, -1
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine:
        return "affine", {"scale": "weight", "shift": "bias"}, -1
    if isinstance(module, nn.RMSNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine:
        return "affine", {"scale": "weight"}, -1
    if isinstance(module, nn.GroupNorm) and module.affine:
        return "affine", {"scale": "weight", "shift": "bias"}, 1
    if isinstance(module, _BATCH_NORMS) and module.affine and not module.training and module.track_running_stats:
        return "affine", {"scale": "weight", "shift": "bias"}, 1
    return None


def _patches(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Each output position's input patch per group: (1, positions, groups, C_in/groups·kernel)."""
    one_d = isinstance(conv, nn.Conv1d)
    if one_d:  # as a 2D convolution of height 1
        x = x.unsqueeze(-2)
    pair = (lambda v: (1, v[0])) if one_d else (lambda v: tuple(v))
    kernel, stride, dilation = pair(conv.kernel_size), pair(conv.stride), pair(conv.dilation)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = (0, 0)
    else:
        padding = (0, 0) if conv.padding == "valid" else ((0, *conv.padding) if one_d else tuple(conv.padding))
    columns = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (1, C·k, L)
    columns = columns.reshape(x.shape[0], conv.groups, -1, columns.shape[-1])
    return columns.permute(0, 3, 1, 2)


def _structured_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the rule multiplies by: the input, its patches, or the normalised input x̂."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _patches(module, x)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, _BATCH_NORMS):
        shape = (1, -1, *([1] * (x.dim() - 2)))
        mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)
    return x


class _Audit(TorchFunctionMode):
    """Records uses of trainable parameters made outside their own layer's call."""

    def __init__(self, owner_of: dict[int, str], names: dict[int, str]) -> None:
        super().__init__()
        self.owner_of, self.names = owner_of, names
        self.active: list[str] = []
        self.outside: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        for value in [*args, *(kwargs or {}).values()]:
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                owner = self.owner_of.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
                if owner is not None and (not self.active or self.active[-1] != owner):
                    self.outside.add(self.names[id(tensor)])
        return func(*args, **(kwargs or {}))


def capture(model: nn.Module, params: Mapping[str, torch.Tensor], call: Callable, x: torch.Tensor) -> Capture:
    """Capture ``model`` (run as ``call(params_and_state, x)``) on a batch of one ``x``."""
    supported: dict[str, tuple[nn.Module, str, dict[str, str], int]] = {}
    unsupported = []
    for name, module in model.named_modules():
        own = {attr: f"{name}.{attr}" if name else attr for attr, _ in module.named_parameters(recurse=False)}
        trainable = {attr: full for attr, full in own.items() if full in params}
        if not trainable:
            continue
        rule = _rule(module)
        if rule is None:
            unsupported.append(f"{name or 'model'} ({type(module).__name__})")
            continue
        kind, roles, axis = rule
        supported[name] = (module, kind, {r: trainable[a] for r, a in roles.items() if a in trainable}, axis)

    def with_hooks(probes: Mapping[str, torch.Tensor] | None, audit: _Audit | None) -> tuple[list, dict, dict]:
        counters: dict[str, int] = defaultdict(int)
        inputs: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        handles = []
        for name, (module, *_rest) in supported.items():

            def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
                if audit is not None:
                    audit.active.append(name)

            def post(mod: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> torch.Tensor:
                key = f"{name}#{counters[name]}"
                counters[name] += 1
                inputs[key] = _structured_input(mod, args[0])
                shapes[key] = tuple(output.shape)
                if audit is not None:
                    audit.active.pop()
                return output if probes is None else output + probes[key]

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return handles, inputs, shapes

    # only parameters of supported layers need the audit: the others fall back anyway
    owner_of = {id(t): n.rpartition(".")[0] for n, t in params.items() if n.rpartition(".")[0] in supported}
    audit = _Audit(owner_of, {id(t): n for n, t in params.items()})
    handles, _, shapes = with_hooks(None, audit)
    try:
        with torch.no_grad(), audit:
            call(params, x)
    finally:
        for handle in handles:
            handle.remove()

    def apply_probed(p: Mapping[str, torch.Tensor], probes: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple:
        handles, inputs, _ = with_hooks(probes, None)
        try:
            return call(p, x), inputs
        finally:
            for handle in handles:
                handle.remove()

    uses = tuple(
        LayerUse(
            key,
            key.partition("#")[0],
            supported[key.partition("#")[0]][1],
            supported[key.partition("#")[0]][2],
            supported[key.partition("#")[0]][3],
        )
        for key in shapes
    )
    excluded = {name: "is also used outside its layer" for name in sorted(audit.outside)}
    return Capture(uses, apply_probed, shapes, tuple(unsupported), excluded)
