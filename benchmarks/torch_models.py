"""The workloads as torch ``nn.Module``s, the way a torch user writes them (eval mode)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks.workloads import BN_EPSILON, HEADS, HIDDEN, TOKENS, VOCABULARY, WIDTH, Workload


def build(workload: Workload, arrays: dict[str, np.ndarray], dtype: str = "float32") -> nn.Module:
    a = {k: torch.as_tensor(v) for k, v in arrays.items()}
    model = {"transformer": _Transformer, "cnn": _CNN, "resnet": _ResNet}.get(workload.kind, _mlp)(a)
    return model.to(getattr(torch, dtype)).eval()


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(*w.shape, bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(w.T)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def _conv(w: torch.Tensor, b: torch.Tensor | None) -> nn.Conv2d:
    conv = nn.Conv2d(w.shape[2], w.shape[3], w.shape[0], padding=w.shape[0] // 2, bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(w.permute(3, 2, 0, 1))
        if b is not None:
            conv.bias.copy_(b)
    return conv


def _mlp(a: dict) -> nn.Module:
    from ntkcore_torch import FactorizedLinear

    depth = sum(k.endswith(".b") for k in a)
    modules: list[nn.Module] = []
    for i in range(depth):
        if f"layer{i}.u" in a:
            u, v = a[f"layer{i}.u"], a[f"layer{i}.v"]
            f = FactorizedLinear(u.shape[0], v.shape[1], rank=u.shape[1])
            with torch.no_grad():
                f.u.weight.copy_(u.T)
                f.v.weight.copy_(v.T)
                f.v.bias.copy_(a[f"layer{i}.b"])
            modules.append(f)
        else:
            modules.append(_linear(a[f"layer{i}.w"], a[f"layer{i}.b"]))
        modules.append(nn.ReLU())
    return nn.Sequential(*modules[:-1])


class _CNN(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.convs = nn.ModuleList(_conv(a[f"conv{i}.w"], a[f"conv{i}.b"]) for i in range(3))
        self.head = _linear(a["head.w"], a["head.b"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2)
        for conv in self.convs:
            y = torch.relu(conv(y))
        return self.head(y.mean(dim=(2, 3)))


class _ResNet(nn.Module):
    """A stem convolution, then one basic residual block (conv-BN-ReLU-conv-BN + skip), pool, dense."""

    def __init__(self, a: dict):
        super().__init__()
        self.stem = _conv(a["conv0.w"], a["conv0.b"])
        self.conv1, self.conv2 = _conv(a["conv1.w"], None), _conv(a["conv2.w"], None)
        self.bn1, self.bn2 = (nn.BatchNorm2d(a["conv1.w"].shape[3], eps=BN_EPSILON) for _ in range(2))
        with torch.no_grad():
            for i, bn in ((1, self.bn1), (2, self.bn2)):
                bn.weight.copy_(a[f"bn{i}.g"])
                bn.bias.copy_(a[f"bn{i}.b"])
                bn.running_mean.copy_(a[f"bn{i}.mean"])
                bn.running_var.copy_(a[f"bn{i}.var"])
        self.head = _linear(a["head.w"], a["head.b"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x.permute(0, 3, 1, 2)))
        y = torch.relu(self.bn1(self.conv1(h)))
        h = torch.relu(h + self.bn2(self.conv2(y)))
        return self.head(h.mean(dim=(2, 3)))


class _Transformer(nn.Module):
    """Pre-LayerNorm block with causal ``nn.MultiheadAttention``; output layer tied to the embedding."""

    def __init__(self, a: dict):
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.mlp1, self.mlp2 = _linear(a["mlp1.w"], a["mlp1.b"]), _linear(a["mlp2.w"], a["mlp2.b"])
        with torch.no_grad():
            self.embed.weight.copy_(a["embed"])
            for name in ("ln1", "ln2"):
                getattr(self, name).weight.copy_(a[f"{name}.g"])
                getattr(self, name).bias.copy_(a[f"{name}.b"])
            self.attn.in_proj_weight.copy_(torch.cat([a[f"{c}.w"].T for c in "qkv"]))
            self.attn.in_proj_bias.copy_(torch.cat([a[f"{c}.b"] for c in "qkv"]))
            self.attn.out_proj.weight.copy_(a["o.w"].T)
            self.attn.out_proj.bias.copy_(a["o.b"])
        self.register_buffer("mask", torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(1))
        self.logits = nn.Linear(WIDTH, VOCABULARY, bias=False)
        self.logits.weight = self.embed.weight  # tied, as transformer libraries do
        assert HIDDEN == a["mlp1.w"].shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask, need_weights=False)[0]
        h = h + self.mlp2(torch.relu(self.mlp1(self.ln2(h))))
        return self.logits(h[:, -1])
