"""The zoo in PyTorch: ``nn.Module`` subclasses loaded with the spec's weights."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from . import Built
from .spec import spec

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def setup_numerics() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def to_native(x: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.as_tensor(x, dtype=DTYPES[dtype] if np.issubdtype(x.dtype, np.floating) else None)


def to_numpy(a: torch.Tensor) -> np.ndarray:
    return a.detach().cpu().numpy()


def _linear(w: np.ndarray, b: np.ndarray) -> nn.Linear:
    layer = nn.Linear(*w.shape)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(w.T))
        layer.bias.copy_(torch.as_tensor(b))
    return layer


class LowRankLinear(nn.Module):
    """y = x·U·V + b (the factorized dense layer of arXiv 2210.04807)."""

    def __init__(self, u: np.ndarray, v: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.as_tensor(u))
        self.v = nn.Parameter(torch.as_tensor(v))
        self.b = nn.Parameter(torch.as_tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.u @ self.v + self.b


class ConvNet(nn.Module):
    """NHWC in, NCHW inside, flattened in NHWC order like the other frameworks."""

    def __init__(self, w: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.as_tensor(w["conv.w"]).permute(3, 2, 0, 1))
            self.conv.bias.copy_(torch.as_tensor(w["conv.b"]))
        self.pool = nn.AvgPool2d(2)
        self.head = _linear(w["head.w"], w["head.b"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(torch.relu(self.conv(x.permute(0, 3, 1, 2))))
        return self.head(y.permute(0, 2, 3, 1).flatten(1))


class Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _module(case: str) -> nn.Module:
    """The case in float64, so that the spec's weights are not rounded on the way in."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _build_module(case)
    finally:
        torch.set_default_dtype(default)


def _build_module(case: str) -> nn.Module:
    w = spec(case).weights
    if case == "mlp":
        return nn.Sequential(
            _linear(w["l1.w"], w["l1.b"]),
            nn.ReLU(),
            _linear(w["l2.w"], w["l2.b"]),
            nn.ReLU(),
            _linear(w["l3.w"], w["l3.b"]),
            nn.ReLU(),
            _linear(w["l4.w"], w["l4.b"]),
        )
    if case == "cnn":
        return ConvNet(w)
    if case == "lowrank":
        return nn.Sequential(
            LowRankLinear(w["l1.u"], w["l1.v"], w["l1.b"]),
            nn.ReLU(),
            LowRankLinear(w["l2.u"], w["l2.v"], w["l2.b"]),
            nn.ReLU(),
            _linear(w["l3.w"], w["l3.b"]),
        )
    if case == "layernorm":
        norm = nn.LayerNorm(8, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.as_tensor(w["ln.gamma"]))
            norm.bias.copy_(torch.as_tensor(w["ln.beta"]))
        return nn.Sequential(_linear(w["l1.w"], w["l1.b"]), norm, nn.Tanh(), _linear(w["l2.w"], w["l2.b"]))
    if case == "batchnorm_frozen":
        norm = nn.BatchNorm1d(8, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.as_tensor(w["bn.gamma"]))
            norm.bias.copy_(torch.as_tensor(w["bn.beta"]))
            norm.running_mean.copy_(torch.as_tensor(w["bn.mean"]))
            norm.running_var.copy_(torch.as_tensor(w["bn.var"]))
        frozen = _linear(w["l2.w"], w["l2.b"]).requires_grad_(False)
        model = nn.Sequential(
            _linear(w["l1.w"], w["l1.b"]), norm, nn.ReLU(), frozen, nn.ReLU(), _linear(w["l3.w"], w["l3.b"])
        )
        return model.eval()
    if case == "multi_output":
        return nn.Sequential(_linear(w["l1.w"], w["l1.b"]), nn.Tanh(), _linear(w["l2.w"], w["l2.b"]), Reshape(3, 2))
    raise KeyError(case)


@functools.cache  # one model per case and dtype, so compiled kernels are shared across tests
def build(case: str, dtype: str) -> Built:
    return Built(_module(case).to(DTYPES[dtype]))


def reference_jacobians(case: str, x: np.ndarray) -> dict[str, np.ndarray]:
    model = _module(case).double()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = tuple(dict(model.named_parameters())[n].detach() for n in names)
    xt = torch.as_tensor(x, dtype=torch.float64)

    def f(*values):
        return torch.func.functional_call(model, dict(zip(names, values)), (xt,))

    jac = torch.autograd.functional.jacobian(f, params)
    n_out = len(spec(case).output_shape) + 1
    return {n: j.reshape(*j.shape[:n_out], -1).numpy() for n, j in zip(names, jac)}


def is_native(a, dtype: str) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == DTYPES[dtype]


def forward(built: Built, x: np.ndarray) -> torch.Tensor:
    dtype = next(built.model.parameters()).dtype
    with torch.no_grad():
        return built.model(torch.as_tensor(x, dtype=dtype))


def freeze(built: Built) -> Built:
    """The same model with no trainable parameter."""
    import copy

    return Built(copy.deepcopy(built.model).requires_grad_(False), built.kwargs)


def train_mode_batchnorm(dtype: str) -> tuple[Built, object]:
    """``batchnorm_frozen`` in training mode, and its full-batch float64 reference Jacobians."""

    def reference(x: np.ndarray) -> dict[str, np.ndarray]:
        model = _module("batchnorm_frozen").train()
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        values = tuple(dict(model.named_parameters())[n].detach() for n in names)
        xt = torch.as_tensor(x, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(
            lambda *v: torch.func.functional_call(model, dict(zip(names, v)), (xt,)), values
        )
        return {n: j.reshape(*j.shape[:2], -1).numpy() for n, j in zip(names, jac)}

    return Built(_module("batchnorm_frozen").to(DTYPES[dtype]).train()), reference
