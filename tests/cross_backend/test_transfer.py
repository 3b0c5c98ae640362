"""ntkcore.transfer and ntkcore.crosscheck across torch, Keras and flax linen: every architecture
transferred from each framework to each other agrees with its source (outputs and kernels);
a deliberately different model is reported with the layer where it differs; every mismatch
is a clear error naming both layers."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest

import ntkcore
from tests.cross_backend import transfer_models as tm

pytestmark = [
    pytest.mark.cross,
    pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="the JAX side is flax linen"),
]
FRAMEWORKS = ("torch", "keras", "jax")


@pytest.fixture
def frameworks(active_backends):
    if set(active_backends) != {"jax", "torch", "tensorflow"}:
        pytest.skip("needs all three frameworks in this run")


def _build(framework: str, arch: str, seed: int, dtype: str):
    if framework == "torch":
        return tm.torch_model(arch, seed, dtype)
    if framework == "keras":
        return tm.keras_model(arch, seed, dtype)
    return tm.flax_model(arch, seed, dtype)


def _transfer(source, target):
    """``target`` with ``source``'s weights, in the form crosscheck takes."""
    s_model, s_params = source if isinstance(source, tuple) else (source, None)
    t_model, t_params = target if isinstance(target, tuple) else (target, None)
    result = ntkcore.transfer(s_model, t_model, source_params=s_params, target_params=t_params)
    return (t_model, result) if isinstance(target, tuple) else result


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_transferred_models_agree(frameworks, arch, dtype):
    x = tm.inputs(arch)
    for source_name, target_name in itertools.permutations(tm.FRAMEWORKS.get(arch, FRAMEWORKS), 2):
        source = _build(source_name, arch, 1, dtype)
        target = _build(target_name, arch, 2, dtype)
        before = ntkcore.crosscheck({source_name: source, target_name: target}, x)
        assert not before.ok, f"{arch}: different initialisations agree: {before}"
        target = _transfer(source, target)
        report = ntkcore.crosscheck({source_name: source, target_name: target}, x, trace_axes=())
        assert report.ok, f"{arch} {dtype} {source_name} -> {target_name}:\n{report}"


def test_crosscheck_all_three_and_every_implementation(frameworks):
    x = tm.inputs("cnn")
    torch_net = _build("torch", "cnn", 1, "float64")
    models = {"torch": torch_net}
    models["keras"] = _transfer(torch_net, _build("keras", "cnn", 2, "float64"))
    models["jax"] = _transfer(torch_net, _build("jax", "cnn", 3, "float64"))
    report = ntkcore.crosscheck(models, x, implementation="all")
    assert report.ok, str(report)
    assert set(report.within) == set(models) and all(len(d) == 2 for d in report.within.values())
    assert len(report.pairs) == 3 and report.max_rel_diff < 1e-9
    text = str(report)
    assert "AGREE" in text and "torch vs keras" in text and "keras vs jax" in text


@pytest.mark.parametrize("how", ["activation", "weight"])
@pytest.mark.parametrize("other", ["keras", "jax"])
def test_a_different_model_is_found_at_its_layer(frameworks, how, other):
    """The second hidden layer's activation changed, or its weight perturbed, in torch: the
    report differs and names layer #1 as the first whose output differs."""
    import torch

    x = tm.inputs("mlp")
    reference = _build(other, "mlp", 1, "float64")
    changed = tm.torch_model("mlp", 2, "float64", activation=torch.sin if how == "activation" else None)
    changed = _transfer(reference, changed)
    assert ntkcore.crosscheck({"torch": changed, other: reference}, x).ok is (how == "weight")
    if how == "weight":
        with torch.no_grad():
            changed.layers[1].weight[0, 0] += 0.05
    report = ntkcore.crosscheck({"torch": changed, other: reference}, x)
    assert not report.ok and report.first_differing_layer is not None, str(report)
    # a weight of layer 1: its output differs; the activation after layer 1: layer 2's output does
    expected = 1 if how == "weight" else 2
    first = report.first_differing_layer
    assert first.index == expected and first.names["torch"] == f"layers.{expected}", str(report)
    assert "first layer whose output differs" in str(report)


def test_mismatches_name_both_layers(frameworks):
    import keras
    from torch import nn

    torch_mlp = tm.torch_model("mlp", 1, "float64")
    short = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(8)])
    with pytest.raises(
        ntkcore.TransferError, match=r"source has 3 parameterised layers and the target 2; the source's extra"
    ):
        ntkcore.transfer(torch_mlp, short)
    wrong_kind = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.LayerNormalization(),
                                   keras.layers.Dense(2)])  # fmt: skip
    with pytest.raises(ntkcore.TransferError, match=r"layer 1 does not correspond: a dense layer against a norm"):
        ntkcore.transfer(torch_mlp, wrong_kind)
    wrong_shape = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(9), keras.layers.Dense(2)]
    )
    with pytest.raises(
        ntkcore.TransferError, match=r"weight has shape \(8, 8\) against \(9, 8\).*\n  source 'layers.1'"
    ):
        ntkcore.transfer(torch_mlp, wrong_shape)
    no_bias = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, use_bias=False), keras.layers.Dense(8),
                                keras.layers.Dense(2)])  # fmt: skip
    with pytest.raises(ntkcore.TransferError, match=r"only the source has \['bias'\]"):
        ntkcore.transfer(torch_mlp, no_bias)
    with pytest.raises(ntkcore.TransferError, match=r"no transfer rule for layer 'model' \(Bilinear\)"):
        ntkcore.transfer(nn.Bilinear(2, 2, 2), torch_mlp)


def test_crosscheck_command(frameworks, tmp_path, monkeypatch, capsys):
    """``ntkcore crosscheck``: exit 0 when the models agree (after --transfer-from), 1 when they
    differ, one-line errors for mistakes."""
    from ntkcore.cli import main

    (tmp_path / "ported.py").write_text(
        "from tests.cross_backend import transfer_models as tm\n"
        "net = tm.torch_model('mlp', 1, 'float32')\n"
        "knet = tm.keras_model('mlp', 2, 'float32')\n"
        "apply, variables = tm.flax_model('mlp', 3, 'float32')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    models = ["--model", "torch=ported:net", "--model", "keras=ported:knet", "--model", "jax=ported:apply"]
    common = [*models, "--params", "jax=ported:variables", "--shape", "4,6"]
    assert main(["crosscheck", *common]) == 1
    assert "DIFFER" in capsys.readouterr().out
    assert main(["crosscheck", *common, "--transfer-from", "torch", "--implementation", "all"]) == 0
    out = capsys.readouterr().out
    assert "AGREE" in out and "torch vs jax" in out
    assert main(["crosscheck", *models, "--params", "flax=ported:variables", "--shape", "4,6"]) == 2
    assert "--params names ['flax'], which no --model names" in capsys.readouterr().err
    assert main(["crosscheck", "--model", "torch", "--shape", "4,6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntkcore: error: --model takes NAME=module:attribute") and err.count("\n") == 1


def test_monte_carlo_is_the_average_over_initialisations(frameworks):
    """ntkcore.monte_carlo over freshly built models equals the explicit mean of their kernels, in
    every framework; an iterable n_samples yields the running averages."""
    x = tm.inputs("mlp")
    factories = {
        "torch": lambda seed: tm.torch_model("mlp", seed, "float64"),
        "keras": lambda seed: tm.keras_model("mlp", seed, "float64"),
        "jax": lambda seed: tm.flax_model("mlp", seed, "float64"),
    }
    for name, factory in factories.items():
        backend = ntkcore.get_backend("tensorflow" if name == "keras" else name)
        kernels = []
        for seed in (5, 6, 7):
            built = factory(seed)
            model, params = built if isinstance(built, tuple) else (built, None)
            kernels.append(backend.to_numpy(ntkcore.ntk(model, x, params=params, trace_axes=(-1,))))
        mean = ntkcore.monte_carlo(factory, x, n_samples=3, seed=5, trace_axes=(-1,))
        np.testing.assert_allclose(backend.to_numpy(mean), np.mean(kernels, axis=0), rtol=1e-12, err_msg=name)
        running = [
            backend.to_numpy(k) for k in ntkcore.monte_carlo(factory, x, n_samples=[1, 3], seed=5, trace_axes=(-1,))
        ]
        np.testing.assert_allclose(running[0], kernels[0], rtol=1e-12)
        np.testing.assert_allclose(running[1], np.mean(kernels, axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="n_samples must be positive"):
        ntkcore.monte_carlo(factories["torch"], x, n_samples=0)
