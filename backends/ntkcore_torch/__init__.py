"""PyTorch adapter: ``nn.Module`` through ``torch.func`` (functional_call, vjp, jvp, vmap)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import array_api_compat
import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ntkcore.adapter import Adapter, replaced_params
from ntkcore.protocol import PreparedModel

from .layers import FactorizedLinear

__all__ = ["FactorizedLinear", "TorchBackend"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextmanager
def _differentiable_kernels() -> Iterator[None]:
    """Attention by its plain formula: the fused inference kernels (MultiheadAttention's and
    TransformerEncoderLayer's fast path, flash SDPA on CPU) have no forward-mode AD."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + module.eps)
    y = y if module.weight is None else y * module.weight
    return y if module.bias is None else y + module.bias


@contextmanager
def _plain_layer_norms(modules: list[nn.LayerNorm]) -> Iterator[None]:
    """``nn.LayerNorm`` by its formula: torch's fused ``layer_norm`` has a wrong second
    forward-mode derivative (a jvp of a jvp, as ``taylor_expand`` takes; 627 against 1.50 on a
    test function). Hooks still see the module's calls."""
    patched = [m for m in modules if "forward" not in m.__dict__]
    for module in patched:
        module.forward = functools.partial(_layer_norm, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _trainable(
    model: nn.Module, params: Any, trainable: Callable[[str], bool] | None, replacement: Callable
) -> dict[str, torch.Tensor]:
    """θ: the parameters with ``requires_grad=True`` (or those ``trainable(name)`` chooses),
    optionally replaced by ``params`` values."""
    chosen = (lambda name, p: p.requires_grad) if trainable is None else (lambda name, p: bool(trainable(name)))
    own = {name: p.detach() for name, p in model.named_parameters() if chosen(name, p)}
    if params is None:
        return own
    if not isinstance(params, Mapping):
        raise TypeError(f"params= for a torch module must be a name -> tensor map, got {type(params).__name__}")
    return replaced_params(
        own,
        params,
        lambda name, value, own: replacement(name, value, own).detach().to(own.device),
        lambda unknown: f"params= names {unknown} that are not trainable parameters of the model; known: {list(own)}",
    )


def _batch_coupling(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, _BATCH_NORMS) and module.training:
            return f"{type(module).__name__} {name or 'model'!r} is in training mode (batch statistics)"
    return None


def _refuse_random(model: nn.Module) -> None:
    for name, module in model.named_modules():
        dropout = module.p if isinstance(module, _DROPOUTS) else getattr(module, "dropout", 0)
        if isinstance(module, (*_DROPOUTS, nn.MultiheadAttention)) and module.training and dropout > 0:
            raise ValueError(
                f"model: {type(module).__name__} {name!r} is in training mode, so f is random and has "
                "no well-defined kernel; call model.eval() first"
            )


class TorchBackend(Adapter):
    """Autodiff interface on ``torch.func`` transforms; no compilation (``jit`` is identity)."""

    name = "torch"
    native = (torch.Tensor,)
    arrays_text = "a torch tensor or numpy array"

    def owns(self, model: Any, params: Any, arrays: tuple[Any, ...]) -> bool:
        return isinstance(model, nn.Module) or any(isinstance(a, torch.Tensor) for a in arrays)

    def prepare(
        self, model: Any, params: Any, trainable: Callable[[str], bool] | None = None, state: Any = None
    ) -> PreparedModel:
        if state is not None:
            raise TypeError("state= is for a haiku transform_with_state model (JAX); this model holds its own state")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module for the torch backend, got {type(model).__name__}")
        _refuse_random(model)
        from .capture import attention_modules, plain_attention
        from .recurrent import recurrent_modules, written_out

        theta = _trainable(model, params, trainable, self.replacement)
        coupling = _batch_coupling(model)
        buffers = dict(model.named_buffers()) if coupling else {}
        attention, recurrent = attention_modules(model), recurrent_modules(model)
        norms = [m for m in model.modules() if type(m) is nn.LayerNorm]

        def apply(p: Mapping[str, torch.Tensor], x: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
            # Train-mode BatchNorm updates its running statistics in place: give it fresh copies,
            # so the kernel has no side effect on the model and the transforms see no mutation
            # of a captured tensor.
            fresh = {name: b.clone() for name, b in buffers.items()}
            with (
                _differentiable_kernels(),
                plain_attention(attention),
                written_out(recurrent),
                _plain_layer_norms(norms),
            ):
                return torch.func.functional_call(model, {**fresh, **p}, (x,), model_kwargs)

        has_embedding = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
        return PreparedModel(
            apply, theta, batch_coupled=coupling, accepts_integer_inputs=lambda x: has_embedding, source=model
        )

    def namespace(self, *arrays: Any) -> Any:
        return array_api_compat.array_namespace(*(arrays or (torch.empty(0),)))

    def from_numpy(self, x: np.ndarray, like: torch.Tensor, *, cast: bool) -> torch.Tensor:
        return torch.as_tensor(x, dtype=like.dtype if cast else None, device=like.device)

    def cast(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(device=like.device, dtype=like.dtype)

    def expected_input(self, prepared: PreparedModel) -> str | None:
        for name, module in prepared.source.named_modules():
            for attr, what in (("in_features", "features on its last axis"), ("in_channels", "channels on axis 1")):
                size = getattr(module, attr, None)
                if isinstance(size, int):
                    return f"its first layer {name or 'model'!r} ({type(module).__name__}) takes {size} {what}"
        return None

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    def is_floating(self, x: torch.Tensor) -> bool:
        return x.dtype.is_floating_point

    def dtype_name(self, x: torch.Tensor) -> str:
        return str(x.dtype).removeprefix("torch.")

    def jvp(self, fn: Callable, primals: Mapping[str, Any], tangents: Mapping[str, Any]) -> tuple[Any, Any]:
        return torch.func.jvp(fn, (dict(primals),), (dict(tangents),))

    def vjp(self, fn: Callable, primals: Mapping[str, Any]) -> tuple[Any, Callable]:
        out, pullback = torch.func.vjp(fn, dict(primals))
        return out, lambda cotangent: pullback(cotangent)[0]

    def vmap(self, fn: Callable, in_axes: tuple[int | None, ...], chunk_size: int | None = None) -> Callable:
        return torch.func.vmap(fn, in_dims=in_axes, chunk_size=chunk_size)

    def jit(self, fn: Callable) -> Callable:
        # torch.compile under torch.func transforms compiles for minutes on CPU for little gain
        # at these sizes; eager torch.func is the default.
        return fn

    def memory_available(self, like: torch.Tensor) -> int | None:
        if like.device.type == "cuda":
            return int(torch.cuda.mem_get_info(like.device)[0])
        return None
