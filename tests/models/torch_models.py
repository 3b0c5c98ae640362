"""The zoo in PyTorch: ``nn.Module`` subclasses loaded with the spec's weights."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from ntkcore_torch import FactorizedLinear

from . import Built
from .spec import kwargs_weights, readout_weights, spec, structured_inputs

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CAPABILITIES = frozenset({"structured"})


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


def _factorized(u: np.ndarray, v: np.ndarray, b: np.ndarray) -> FactorizedLinear:
    layer = FactorizedLinear(u.shape[0], v.shape[1], rank=u.shape[1])
    with torch.no_grad():
        layer.u.weight.copy_(torch.as_tensor(u.T))
        layer.v.weight.copy_(torch.as_tensor(v.T))
        layer.v.bias.copy_(torch.as_tensor(b))
    return layer


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


class Transformer(nn.Module):
    """The spec's pre-LayerNorm block: nn.MultiheadAttention with a causal mask, tied logits."""

    def __init__(self, w: dict) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.ln1, self.ln2 = nn.LayerNorm(8, eps=1e-5), nn.LayerNorm(8, eps=1e-5)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp1, self.mlp2 = _linear(w["mlp1.w"], w["mlp1.b"]), _linear(w["mlp2.w"], w["mlp2.b"])
        t = {k: torch.as_tensor(v) for k, v in w.items()}
        with torch.no_grad():
            self.embed.weight.copy_(t["embed.table"])
            for name in ("ln1", "ln2"):
                getattr(self, name).weight.copy_(t[f"{name}.gamma"])
                getattr(self, name).bias.copy_(t[f"{name}.beta"])
            self.attn.in_proj_weight.copy_(torch.cat([t[f"attn.w{c}"].T for c in "qkv"]))
            self.attn.in_proj_bias.copy_(torch.cat([t[f"attn.b{c}"] for c in "qkv"]))
            self.attn.out_proj.weight.copy_(t["attn.wo"].T)
            self.attn.out_proj.bias.copy_(t["attn.bo"])
        self.register_buffer("mask", torch.ones(4, 4, dtype=torch.bool).triu(1))
        self.logits = nn.Linear(8, 7, bias=False)
        self.logits.weight = self.embed.weight  # tied the usual way: one Parameter in two modules

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask, need_weights=False)[0]
        h = h + self.mlp2(torch.relu(self.mlp1(self.ln2(h))))
        return self.logits(h)


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
            _factorized(w["l1.u"], w["l1.v"], w["l1.b"]),
            nn.ReLU(),
            _factorized(w["l2.u"], w["l2.v"], w["l2.b"]),
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
    if case == "wide":
        return nn.Sequential(_linear(w["l1.w"], w["l1.b"]), nn.ReLU(), _linear(w["l2.w"], w["l2.b"]))
    if case == "multi_output":
        return nn.Sequential(_linear(w["l1.w"], w["l1.b"]), nn.Tanh(), _linear(w["l2.w"], w["l2.b"]), Reshape(3, 2))
    if case == "transformer":
        return Transformer(w).eval()
    raise KeyError(case)


@functools.cache  # one model per case and dtype, so compiled kernels are shared across tests
def build(case: str, dtype: str) -> Built:
    return Built(_module(case).to(DTYPES[dtype]))


def reference_jacobians(case: str, x: np.ndarray) -> dict[str, np.ndarray]:
    model = _module(case).double()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = tuple(dict(model.named_parameters())[n].detach() for n in names)
    xt = to_native(x, "float64")

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


class _Twice(nn.Module):
    """One Linear applied twice: its weight's two uses need their cross terms."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class _LogScale(nn.Module):
    """A learned per-feature log-scale: a module with parameters that no rule knows."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.exp()


class _NoRule(nn.Module):
    """A parameterised layer without a structure rule between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.scale, self.l2 = nn.Linear(6, 8), _LogScale(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.scale(self.l1(x))))


class _TiedTokens(nn.Module):
    """Token ids → embedding → LayerNorm → per-token Linear → logits tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.norm(self.embed(ids))))
        return nn.functional.linear(h, self.embed.weight)[..., :4]  # tied output projection


class _Attention(nn.Module):
    """Embedding, multi-head self-attention (its projections are not nn.Linear calls), token MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.out(torch.relu(self.mlp(h))).mean(dim=1)


class _Convs(nn.Module):
    """Strided (reflect padding), depthwise dilated ('same' padding) and grouped 2D convolutions,
    1D ones, and a 3D one with circular padding."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4)
        self.c3 = nn.Conv2d(4, 6, 2, groups=2, bias=False)
        self.d1 = nn.Conv1d(2, 3, 3, padding="same", dilation=2)
        self.d2 = nn.Conv1d(3, 3, 2, stride=2)
        self.v = nn.Conv3d(1, 2, (2, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1), padding_mode="circular")
        self.head = nn.Linear(6 * 3 * 3 + 3 * 4 + 2 * 4 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 3, 1, 2)
        y = torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(y))))))
        z = torch.tanh(self.d2(torch.tanh(self.d1(x[:, 0].permute(0, 2, 1)))))
        v = torch.tanh(self.v(x.permute(0, 3, 1, 2)[:, None]))
        return self.head(torch.cat([y.flatten(1), z.flatten(1), v.flatten(1)], dim=1))


class _Norms(nn.Module):
    """RMSNorm, GroupNorm, and eval-mode BatchNorm2d after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.l1 = nn.Linear(4 * 8 * 8, 8)
        self.rms = nn.RMSNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x.permute(0, 3, 1, 2)))).flatten(1)
        return self.head(torch.tanh(self.gn(self.rms(self.l1(h)))))


def structured_case(name: str) -> tuple[Built, np.ndarray, np.ndarray, str | None]:
    """(model, x1, x2, fallback expected in the warning or None) for the structured tests."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        models = {
            "twice": _Twice,
            "norule": _NoRule,
            "tied": _TiedTokens,
            "attention": _Attention,
            "norms": _Norms,
            "convs": _Convs,
        }
        model = models[name]()
        if name in ("norms", "convs"):
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, nn.BatchNorm2d):
                        module.running_mean.uniform_(-0.5, 0.5)
                        module.running_var.uniform_(0.5, 1.5)
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        x1, x2 = structured_inputs(name)
        expected = {
            "twice": None,
            "norule": "scale (_LogScale)",
            "tied": "embed.weight",
            "attention": None,
            "norms": None,
            "convs": None,
        }[name]
        return Built(model.eval()), x1, x2, expected
    finally:
        torch.set_default_dtype(default)


STRUCTURED_CASES = ("twice", "norule", "tied", "attention", "norms", "convs")


def factorized_case() -> Built:
    """ntkcore's factorized dense layer (rank 2) in a small model."""
    torch.manual_seed(0)
    model = nn.Sequential(FactorizedLinear(6, 8, rank=2), nn.ReLU(), nn.Linear(8, 3))
    return Built(model.double())


def linear(w: np.ndarray, b: np.ndarray) -> Built:
    """One dense layer f(x) = x·w + b (w is (in, out)), float64."""
    layer = nn.Linear(*w.shape, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(w.T))
        layer.bias.copy_(torch.as_tensor(b))
    return Built(layer)


class _Coupled(nn.Module):
    """A dense layer after an operation across the batch: examples interact."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.dense = how, nn.Linear(6, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "centering":
            x = x - x.mean(0)
        elif self.how == "batch_statistic":  # BatchNorm-like: the batch's own mean and spread
            x = (x - x.mean(0)) / (x.std(0) + 1.0)
        else:  # attention across the examples of the batch
            x = torch.softmax(x @ x.T, dim=-1) @ x
        return self.dense(x)


def coupled_models() -> dict[str, Built]:
    """Three float64 models whose examples interact (inputs (N, 6), outputs (N, 3))."""
    return {how: Built(_Coupled(how)) for how in ("centering", "batch_statistic", "across_examples")}


def bad_params() -> list[tuple[Built, type, str]]:
    """The mlp with params= that do not match its parameters: (model, error type, message pattern)."""
    model = _build_module("mlp").to(torch.float64)
    return [
        (
            Built(model, {"params": {"0.bias": torch.ones(1, dtype=torch.float64)}}),
            ValueError,
            r"params\['0\.bias'\] has shape \(1,\), but the parameter has \(8,\)",
        ),
        (
            Built(model, {"params": {"0.bias": torch.ones(8, dtype=torch.float32)}}),
            TypeError,
            r"params\['0\.bias'\] has dtype float32, but the parameter is float64",
        ),
        (
            Built(model, {"params": {"l9.bias": torch.ones(8, dtype=torch.float64)}}),
            ValueError,
            r"names \['l9\.bias'\] that are not",
        ),
    ]


def bad_params_together() -> tuple[Built, list[str]]:
    """Two mismatches in one params= map, and the names the one error must give."""
    model = _build_module("mlp").to(torch.float64)
    params = {"0.bias": torch.ones(1, dtype=torch.float64), "2.weight": torch.ones(8, 8, dtype=torch.float32)}
    return Built(model, {"params": params}), ["0.bias", "2.weight"]


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8, dtype=torch.float64)
        self.a, self.b = nn.Linear(8, 3, dtype=torch.float64), nn.Linear(8, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> dict:
        h = torch.tanh(self.body(x))
        return {"a": self.a(h), "b": (self.b(h), 2 * self.a(h))}


class _Record:
    """An output object (as transformers' ModelOutput is to a model's user): not an array."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _ObjectOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(6, 3, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> _Record:
        return _Record(self.dense(x))


def multi_output() -> Built:
    """float64: inputs (N, 6), output {"a": (N, 3), "b": ((N, 2), (N, 3))}."""
    torch.manual_seed(0)
    return Built(_TwoHeads())


def object_output() -> Built:
    """float64: inputs (N, 6), output an object whose ``logits`` is (N, 3)."""
    torch.manual_seed(0)
    return Built(_ObjectOutput())


class _Recurrent(nn.Module):
    """A recurrent classifier: the last time step's output through a dense head."""

    def __init__(self, cell: type, **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = options.get("batch_first", False)
        self.rnn = cell(4, 5, dtype=torch.float64, **options)
        width = 5 * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(width, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x if self.batch_first else x.transpose(0, 1))[0]
        return self.head((out if self.batch_first else out.transpose(0, 1))[:, -1])


def recurrent_models() -> dict[str, tuple[Built, object]]:
    """float64 recurrent models on inputs (N, 6 steps, 4), outputs (N, 2), each with its float64
    reference Jacobians from torch's own autodiff (the fused kernels, no vmap)."""
    configurations = {
        "rnn": (nn.RNN, {"batch_first": True}),
        "lstm": (nn.LSTM, {"batch_first": True}),
        "gru": (nn.GRU, {"batch_first": True}),
        "lstm_stacked_bidirectional_seq_first": (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
        "gru_bidirectional": (nn.GRU, {"batch_first": True, "bidirectional": True}),
        "rnn_relu_stacked": (nn.RNN, {"batch_first": True, "num_layers": 2, "nonlinearity": "relu"}),
    }
    found = {}
    for name, (cell, options) in configurations.items():
        model = _Recurrent(cell, **options).eval()

        def reference(x: np.ndarray, model: nn.Module = model) -> dict[str, np.ndarray]:
            names = [n for n, _ in model.named_parameters()]
            values = tuple(p.detach() for _, p in model.named_parameters())
            xt = torch.as_tensor(x, dtype=torch.float64)
            jac = torch.autograd.functional.jacobian(
                lambda *v: torch.func.functional_call(model, dict(zip(names, v)), (xt,)), values
            )
            return {n: j.reshape(*j.shape[:2], -1).numpy() for n, j in zip(names, jac)}

        found[name] = (Built(model), reference)
    return found


def transformers_models() -> dict[str, tuple[Built, np.ndarray, object, list[str]]]:
    """Tiny float64 GPT-2, BERT and ViT from transformers configs (random weights), as users call
    them: ``(model with output=, inputs, reference Jacobians, parameters that fall back)``."""
    import transformers as hf

    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(1, 50, size=(3, 6))
    ids[:, -1] = 0  # BERT's padding id: a row without gradient
    images = np.random.default_rng(1).normal(size=(2, 3, 8, 8))
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "hidden_size": 32}
    cases = {
        "gpt2": (
            hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16)),
            lambda out: out.logits[:, -1],
            ids,
            [],
        ),
        "bert": (
            hf.BertModel(hf.BertConfig(vocab_size=50, max_position_embeddings=16, **small)),
            lambda out: out.last_hidden_state[:, 0],
            ids,
            [],
        ),
        "vit": (
            hf.ViTModel(hf.ViTConfig(image_size=8, patch_size=4, num_channels=3, **small)),
            lambda out: out.last_hidden_state[:, 0],
            images,
            [],
        ),
    }
    found = {}
    for name, (model, output, x, fallback) in cases.items():
        model = model.to(torch.float64).eval()
        model.config._attn_implementation = "eager"

        def reference(x: np.ndarray, model: nn.Module = model, output: object = output) -> dict[str, np.ndarray]:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            values = tuple(dict(model.named_parameters())[n].detach() for n in names)
            xt = torch.as_tensor(x)
            jac = torch.autograd.functional.jacobian(
                lambda *v: output(torch.func.functional_call(model, dict(zip(names, v)), (xt,))), values
            )
            return {n: j.reshape(*j.shape[:2], -1).numpy() for n, j in zip(names, jac)}

        found[name] = (Built(model, {"output": output}), x, reference, fallback)
    return found


class _Readout(nn.Module):
    """tests/models/spec.py, ``READOUT_VARIANTS``."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        w = readout_weights()
        self.variant = variant
        if variant == "tied":
            self.embedding = nn.Embedding(11, 4)
            self.body = nn.Linear(4, 4, bias=False)
            with torch.no_grad():
                self.embedding.weight.copy_(torch.as_tensor(w["embedding"]))
                self.body.weight.copy_(torch.as_tensor(w["w_tied"].T))
            return
        self.body = _linear(w["w1"], w["b1"])
        self.head = _linear(w["a"], w["b"])
        if variant == "no_bias":
            self.head.bias = None
        if variant == "after_readout":
            self.branch = nn.Linear(4, 2, bias=False)
            self.zero = nn.Linear(2, 11, bias=False)
            with torch.no_grad():
                self.branch.weight.copy_(torch.as_tensor(w["branch"].T))
                self.zero.weight.zero_()
        frozen = {"frozen_body": self.body, "frozen_readout": self.head}.get(variant)
        if frozen is not None:
            frozen.weight.requires_grad_(False)
            frozen.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "tied":
            return torch.tanh(self.body(self.embedding(x))) @ self.embedding.weight.T
        h = torch.tanh(self.body(x))
        out = self.head(h)
        return out + self.zero(self.branch(h)) if self.variant == "after_readout" else out


def readout_model(variant: str) -> Built:
    """float64: tests/models/spec.py, ``READOUT_VARIANTS``."""
    return Built(_Readout(variant).to(torch.float64))


class _Keep(nn.Module):
    """tests/models/spec.py, ``kwargs_weights``: ``keep`` as a keyword argument, or as the last
    input feature (``in_input``)."""

    def __init__(self, in_input: bool) -> None:
        super().__init__()
        w = kwargs_weights()
        self.in_input = in_input
        self.l1, self.l2 = _linear(w["w1"], w["b1"]), _linear(w["w2"], w["b2"])

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        if self.in_input:
            x, keep = x[..., :-1], x[..., -1]
        h = torch.tanh(self.l1(x)) * keep[..., None].to(x.dtype)
        return self.l2(h.sum(1)) * scale


def kwargs_model(in_input: bool = False) -> Built:
    """float64: tests/models/spec.py, ``kwargs_weights``."""
    return Built(_Keep(in_input).to(torch.float64))
