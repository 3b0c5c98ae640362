"""PyTorch specifics of structured derivatives: MultiheadAttention in every calling convention
(self-attention captured as dense layers; cross-attention falls back, exactly and warned), and
an embedding tied into an output Linear the usual way (one Parameter in two modules), summed
from per-example gradients without a fallback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ntkcore


@pytest.fixture
def torch(active_backends):
    if "torch" not in active_backends:
        pytest.skip("torch not under test")
    import torch

    return torch


def _model(torch, *, batch_first: bool, mode: str):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 3, batch_first=batch_first)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            seq = x if batch_first else x.transpose(0, 1)
            length = seq.shape[1] if batch_first else seq.shape[0]
            if mode == "cross":
                out, _ = self.attn(seq, seq.flip(-1), seq)
            elif mode == "masks":
                padding = torch.zeros(x.shape[0], length, dtype=x.dtype)
                padding[:, -1] = -torch.inf
                causal = torch.full((length, length), -1.5, dtype=x.dtype).triu(1)  # float masks
                out, _ = self.attn(seq, seq, seq, key_padding_mask=padding, attn_mask=causal)
            else:
                out, weights = self.attn(seq, seq, seq, need_weights=mode == "weights")
            out = out if batch_first else out.transpose(0, 1)
            if mode == "weights":  # (N, L, S) head-averaged attention weights
                out = out + weights[..., :1]
            return self.head(torch.tanh(out)).mean(dim=1)

    torch.manual_seed(0)
    return Block().double().eval()


@pytest.mark.parametrize("mode", ["plain", "weights", "masks", "cross"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(torch, batch_first, mode):
    model = _model(torch, batch_first=batch_first, mode=mode)
    rng = np.random.default_rng(0)
    x1, x2 = (torch.as_tensor(rng.normal(size=(n, 4, 6))) for n in (3, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = ntkcore.ntk(model, x1, x2, implementation="structured")
    expected = ntkcore.ntk(model, x1, x2, implementation="jacobian_contraction")
    np.testing.assert_allclose(kernel.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12 * expected.abs().max().item())
    nvp = ntkcore.ntk(model, x1, x2, implementation="ntk_vector_products")  # forward mode through attention
    np.testing.assert_allclose(nvp.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12 * expected.abs().max().item())
    messages = [str(w.message) for w in caught if issubclass(w.category, ntkcore.StructuredFallbackWarning)]
    if mode == "cross":
        assert len(messages) == 1 and "attn.in_proj_weight" in messages[0] and "attn.out_proj.weight" in messages[0]
    else:
        assert messages == []


def test_attention_dropout_in_training_is_refused(torch):
    model = _model(torch, batch_first=True, mode="plain").train()
    model.attn.dropout = 0.1
    with pytest.raises(ValueError, match=r"MultiheadAttention 'attn' is in training mode"):
        ntkcore.ntk(model, torch.zeros(2, 4, 6, dtype=torch.float64))


@pytest.mark.parametrize("axes", [{}, {"trace_axes": (-1,)}, {"diagonal_axes": (0,)}])
def test_embedding_tied_to_output_linear(torch, axes):
    nn = torch.nn

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(9, 5)
            self.mix = nn.Linear(5, 5)
            self.out = nn.Linear(5, 9)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.mix(self.embed(ids)))).mean(dim=1)

    torch.manual_seed(0)
    model = Tied().double()
    ids1 = torch.tensor([[1, 2, 2], [0, 8, 1], [3, 3, 3]])
    ids2 = torch.tensor([[2, 1, 0], [8, 8, 4], [5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ntkcore.StructuredFallbackWarning)
        kernel = ntkcore.ntk(model, ids1, ids2, implementation="structured", **axes)
        again = ntkcore.ntk(model, ids1, None, implementation="structured", **axes)
    expected = ntkcore.ntk(model, ids1, ids2, implementation="jacobian_contraction", **axes)
    expected_self = ntkcore.ntk(model, ids1, None, implementation="jacobian_contraction", **axes)
    np.testing.assert_allclose(kernel.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(again.numpy(), expected_self.numpy(), rtol=1e-10, atol=1e-12)


def test_subclass_that_overrides_forward_falls_back(torch):
    """A Linear subclass with its own forward is not a dense layer: fallback, not a wrong number."""
    nn = torch.nn

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Doubled(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    with pytest.warns(ntkcore.StructuredFallbackWarning, match=r"0 \(Doubled\)"):
        kernel = ntkcore.ntk(model, x1, x2, implementation="structured")
    expected = ntkcore.ntk(model, x1, x2, implementation="jacobian_contraction")
    np.testing.assert_allclose(kernel.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)


def test_factorize_keeps_device_dtype_mode_and_frozen_flags(torch):
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double().eval()
    model[2].bias.requires_grad_(False)
    new = ntkcore.factorize(model, 2, layers=["0", "2"])
    assert not new.training and new[2].v.bias.dtype == torch.float64
    assert not new[2].v.bias.requires_grad and new[2].u.weight.requires_grad and new[2].v.weight.requires_grad
    assert model[0].__class__ is torch.nn.Linear  # the original is untouched
    with pytest.raises(ValueError, match="params= is not used to factorize a torch module"):
        ntkcore.factorize(model, 2, params={})


def test_factorize_leaves_attention_projections_alone(torch):
    from tests.models import torch_models

    model = torch_models.build("transformer", "float64").model
    dense = ntkcore.get_backend("torch").dense_layers(model, None)
    assert dense and not any("out_proj" in name for name in dense)  # MHA reads out_proj.weight itself
    new = ntkcore.factorize(model, 2)
    x = torch.as_tensor(np.random.default_rng(0).integers(0, 7, size=(3, 4)))
    assert new(x).shape == model(x).shape


def _tokens_model(torch, form: str):
    """Parameters broadcast into token activations by hand, outside any layer with a rule."""
    nn = torch.nn

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 4)
            self.position = nn.Parameter(torch.randn(1, 5, 4))  # a learned position table
            self.cls = nn.Parameter(torch.randn(1, 1, 4))  # a class token
            self.shift = nn.Parameter(torch.randn(4))  # a bias added by hand, shared by every token
            if form == "features":
                self.gate = nn.Parameter(torch.randn(4, 1, 1))  # broadcast over features: no rule
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.proj(x) + self.position  # (N, 5, 4)
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1)
            h = torch.tanh(h) + self.shift
            h = torch.add(self.shift, torch.tanh(h))  # a second broadcast use of the same parameter
            if form == "matmul":  # the class token also used by a matmul: exact fallback
                h = h + (h @ self.cls.reshape(4, 1)) * 0.1
            if form == "features":
                h = (h.unsqueeze(1) * 1.0 + self.gate).mean(dim=1)
            return self.head(torch.tanh(h)).mean(dim=1)

    torch.manual_seed(0)
    return Tokens().double().eval()


@pytest.mark.parametrize(
    "form, fallback",
    [("plain", []), ("matmul", ["cls"]), ("features", ["gate"])],
)
def test_parameters_broadcast_over_tokens_are_structured(torch, form, fallback):
    """A position table, a class token and a bias added by hand are embedding-rule calls (ids
    say which row each token reads); any other use of such a parameter falls back, exactly."""
    model = _tokens_model(torch, form)
    x1, x2 = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = ntkcore.ntk(model, x1, x2, implementation="structured")
    messages = [str(w.message) for w in caught if issubclass(w.category, ntkcore.StructuredFallbackWarning)]
    if fallback:
        assert len(messages) == 1 and all(repr(name) in messages[0] for name in fallback), messages
        assert "'position'" not in messages[0] and "'shift'" not in messages[0]
    else:
        assert not messages, messages
    expected = ntkcore.ntk(model, x1, x2, implementation="jacobian_contraction")
    np.testing.assert_allclose(kernel.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
