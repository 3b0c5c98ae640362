"""transformers models built from tiny configs (random weights), as users call them: a
``ModelOutput`` chosen by ``output=``, GPT-2's ``Conv1D`` layers, BERT's padded word embeddings,
ViT's patch projection — every implementation against torch's own float64 autodiff, and
structured derivatives covering every parameter that has a rule."""

from __future__ import annotations

import ast
import re
import warnings

import numpy as np
import pytest

import ntkcore
from ntkcore.implementations import AUTO, REGISTRY
from ntkcore.testing import reference_kernel

# float64. ViT's NTK-vector products agree to 9e-11 of the largest entry (measured), the other
# implementations and models to 1e-15: 1e-9 leaves room for that while a missing or mistaken
# layer shows at 1e-3 or more.
RTOL = 1e-9


def _models(zoo):
    if zoo.transformers_models is None:
        pytest.skip("the transformers zoo is torch's")
    pytest.importorskip("transformers")
    return zoo.transformers_models()


@pytest.mark.parametrize("implementation", [*REGISTRY, AUTO])
def test_transformers_models_are_exact(backend, zoo, implementation):
    for name, (built, x, reference, _) in _models(zoo).items():
        expected = reference_kernel(reference(x), output_ndim=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ntkcore.StructuredFallbackWarning)
            kernel = ntkcore.ntk(built.model, x, implementation=implementation, **built.kwargs).numpy()
        np.testing.assert_allclose(kernel, expected, rtol=0, atol=RTOL * np.abs(expected).max(), err_msg=name)


def test_transformers_models_are_structured(backend, zoo):
    for name, (built, x, _, fallback) in _models(zoo).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ntkcore.ntk(built.model, x, implementation="structured", **built.kwargs)
        messages = [str(w.message) for w in caught if issubclass(w.category, ntkcore.StructuredFallbackWarning)]
        if not fallback:
            assert not messages, f"{name}: {messages}"
            continue
        assert len(messages) == 1, f"{name}: {messages}"
        named = re.search(r"Parameters (\[.*?\]) use the exact", messages[0]).group(1)
        assert sorted(ast.literal_eval(named)) == sorted(fallback), f"{name}: {messages[0]}"


def test_a_model_output_needs_output(backend, zoo):
    built, x, _, _ = _models(zoo)["gpt2"]
    with pytest.raises(TypeError, match=r"CausalLMOutputWithCrossAttentions, not an array: .*output='logits'"):
        ntkcore.ntk(built.model, x)
    kernel = ntkcore.ntk(built.model, x, output="logits", trace_axes=(-1,))
    assert tuple(kernel.shape) == (3, 3, 6, 6)


def test_gpt2_frozen_tied_readout_is_reduced(backend, zoo):
    """GPT-2 with its embedding frozen (fine-tuning the blocks): ``lm_head`` is tied to ``wte``,
    a constant of the kernel, so the readout reduction applies (no cross term) and equals the
    general path; float64, 1e-10 of the largest entry (sums in another order, rounding ~1e-15)."""
    if zoo.transformers_models is None:
        pytest.skip("the transformers zoo is torch's")
    hf = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = hf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = hf.GPT2LMHeadModel(config).double().eval()
    model.transformer.wte.weight.requires_grad_(False)
    ids = torch.randint(0, 50, (3, 5))
    options = {"output": lambda out: out.logits[:, -1], "model_kwargs": {"logits_to_keep": 1}}
    readout = ntkcore.explain(model, ids, trace_axes=(-1,), **options).readout
    assert readout is not None and "'lm_head' (d = 16 -> O = 50, frozen): Θ = A·Θ_h·Aᵀ;" in readout
    for axes in ({}, {"trace_axes": (-1,)}, {"diagonal_axes": (-1,)}):
        for implementation in ("structured", "ntk_vector_products"):
            reduced = ntkcore.ntk(model, ids, implementation=implementation, reduce_readout=True, **axes, **options)
            general = ntkcore.ntk(model, ids, implementation=implementation, reduce_readout=False, **axes, **options)
            atol = 1e-10 * general.abs().max().item()
            np.testing.assert_allclose(reduced.numpy(), general.numpy(), rtol=0, atol=atol)
