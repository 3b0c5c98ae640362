"""``ntkcore.explain`` and ``implementation="auto"``'s memory budget, on every backend.

The predicted FLOPs of Jacobian contraction and NTK-vector products are checked against the
cost table's formulas written out by hand for the MLP case (exact integers: the model has
only dense layers, whose forward FLOPs are 2 per multiply-add of the weights).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import ntkcore
from ntkcore.cost_model import METHODS
from tests.models.spec import CASES, inputs, spec


def _explain(zoo, case: str, x2: bool = False, **options):
    built = zoo.build(case, "float32")
    x1, x2_ = inputs(case)
    native2 = zoo.to_native(x2_, "float32") if x2 else None
    return ntkcore.explain(built.model, zoo.to_native(x1, "float32"), native2, **options, **built.kwargs)


@pytest.mark.filterwarnings("ignore::ntkcore.StructuredFallbackWarning")
@pytest.mark.parametrize("case", CASES)
def test_explain_every_zoo_model(backend, zoo, case):
    result = _explain(zoo, case, trace_axes=(-1,))
    expected = [m for m in METHODS if m != "structured" or "structured" in zoo.CAPABILITIES]
    assert list(result.estimates) == expected
    assert result.choice in expected
    best = min(result.estimates.values(), key=lambda e: e.seconds)
    assert result.choice == best.implementation  # the default budget is far above these sizes
    for estimate in result.estimates.values():
        assert estimate.flops > 0 and estimate.peak_bytes > 0 and estimate.seconds > 0
    text = str(result)
    assert "<- choice" in text and result.choice in text and f"kernel {result.kernel_shape}" in text
    if "structured" in zoo.CAPABILITIES:
        trainable = spec(case).n_trainable
        assert result.layers and sum(layer.params for layer in result.layers) >= trainable  # tied: per use
        assert "layers, as structured derivatives treat them" in text


@pytest.mark.parametrize("x2", [False, True])
def test_mlp_flops_match_the_cost_table(backend, zoo, x2):
    case = spec("mlp")  # 6 → 8 → 8 → 8 → 3
    widths = [(6, 8), (8, 8), (8, 8), (8, 3)]
    f = sum(2 * a * b for a, b in widths)  # forward FLOPs per example
    p = sum(a * b + b for a, b in widths)
    o = case.output_shape[0]
    x1, x2_ = inputs("mlp")
    n1, n2 = len(x1), len(x2_) if x2 else len(x1)
    vjps = (n1 + n2 if x2 else n1) * (f + 2 * o * f)
    result = _explain(zoo, "mlp", x2=x2)
    assert result.estimates["jacobian_contraction"].flops == vjps + 2 * n1 * n2 * o * o * p
    assert result.estimates["ntk_vector_products"].flops == n2 * (f + 2 * o * f) + n1 * n2 * o * 3 * f
    traced = _explain(zoo, "mlp", x2=x2, trace_axes=(-1,))
    assert traced.estimates["jacobian_contraction"].flops == vjps + 2 * n1 * n2 * o * p


def test_explicit_implementation_is_reported_as_the_choice(backend, zoo):
    result = _explain(zoo, "mlp", implementation="ntk_vector_products")
    assert result.choice == "ntk_vector_products"


def test_impossible_budget_is_a_clear_error(backend, zoo):
    built = zoo.build("mlp", "float32")
    x1 = zoo.to_native(inputs("mlp")[0], "float32")
    with pytest.raises(ntkcore.MemoryBudgetError, match=r"no implementation fits the memory budget of 10 B") as error:
        ntkcore.ntk(built.model, x1, memory_budget=10, **built.kwargs)
    for name in ("jacobian_contraction", "ntk_vector_products", "trace_axes", "batch_size=", "out="):
        assert name in str(error.value)
    result = _explain(zoo, "mlp", memory_budget=10)
    assert result.choice is None and "no implementation fits" in str(result)


def test_budget_excludes_what_does_not_fit(backend, zoo):
    free = _explain(zoo, "mlp")
    peaks = sorted(e.peak_bytes for e in free.estimates.values())
    budget = math.floor(peaks[0]) + 1  # only the leanest fits
    leanest = min(free.estimates.values(), key=lambda e: e.peak_bytes).implementation
    assert _explain(zoo, "mlp", memory_budget=budget).choice == leanest
    built = zoo.build("mlp", "float32")
    x1 = inputs("mlp")[0]
    kernel = ntkcore.ntk(built.model, zoo.to_native(x1, "float32"), memory_budget=budget, **built.kwargs)
    assert np.all(np.isfinite(zoo.to_numpy(kernel)))


def test_command_line(backend, zoo, tmp_path, monkeypatch, capsys):
    from ntkcore.cli import main

    target = f"explain_target_{backend}"  # a module per backend: imports are cached
    (tmp_path / f"{target}.py").write_text(
        f"from {zoo.__name__} import build\n"
        "built = build('mlp', 'float32')\n"
        "model = built.model\n"
        "params = built.kwargs.get('params')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x1 = tmp_path / "x1.npy"
    np.save(x1, inputs("mlp")[0].astype(np.float32))
    extra = ["--params", f"{target}:params"] if "params" in zoo.build("mlp", "float32").kwargs else []
    assert main(["explain", f"{target}:model", "--x1", str(x1), "--trace-axes", "-1", *extra]) == 0
    out = capsys.readouterr().out
    assert f"ntkcore.explain: {backend}" in out and "<- choice" in out and f"kernel ({len(inputs('mlp')[0])}," in out
    assert main(["explain", f"{target}:model", "--shape", "5,6", "--memory-budget", "1kB", *extra]) == 1
    assert "no implementation fits the memory budget" in capsys.readouterr().out
