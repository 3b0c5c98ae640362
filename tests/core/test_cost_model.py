"""The cost model, the memory budget and explain, with no framework: shapes and the plugin adapter."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

import ntkcore
from ntkcore import cost_model, memory
from ntkcore.axes import KernelAxes
from ntkcore.cost_model import ModelShape, estimate
from ntkcore.rules.dense import orders as dense_orders

CONSTANTS = cost_model.constants("jax", "cpu")


def _axes(out: tuple[int, ...], **options) -> KernelAxes:
    return KernelAxes.create(options.get("trace_axes", ()), options.get("diagonal_axes", ()), (1, *out))


@pytest.mark.parametrize("n2", [None, 5])
def test_jacobian_contraction_and_products_follow_the_cost_table(n2):
    shape = ModelShape(params=1000, forward_flops=1800.0, activations=40)
    n1, o, f, p = 7, 4, 1800, 1000
    m = n1 if n2 is None else n2
    passes = (n1 if n2 is None else n1 + n2) * (f + 2 * o * f)
    full = estimate(shape, "jacobian_contraction", n1, n2, (o,), _axes((o,)), 4, CONSTANTS)
    assert full.flops == passes + 2 * n1 * m * o * o * p
    traced = estimate(shape, "jacobian_contraction", n1, n2, (o,), _axes((o,), trace_axes=-1), 4, CONSTANTS)
    assert traced.flops == passes + 2 * n1 * m * o * p
    products = estimate(shape, "ntk_vector_products", n1, n2, (o,), _axes((o,)), 4, CONSTANTS)
    assert products.flops == m * (f + 2 * o * f) + n1 * m * o * 3 * f
    diagonal = estimate(shape, "ntk_vector_products", n1, None, (o,), _axes((o,), diagonal_axes=0), 4, CONSTANTS)
    assert diagonal.flops == n1 * (f + 2 * o * f) + n1 * o * 3 * f
    assert full.peak_bytes - traced.peak_bytes == 4 * n1 * m * (o * o - 1)  # only the kernel's entries differ


def test_seconds_combine_the_calibrated_constants():
    shape = ModelShape(params=10**6, forward_flops=2e6, activations=1000, calls=4)
    e = estimate(shape, "jacobian_contraction", 8, None, (10,), _axes((10,)), 4, CONSTANTS)
    expected = (
        CONSTANTS["overhead_s"]["jacobian_contraction"]
        + shape.calls * CONSTANTS["per_layer_s"]["jacobian_contraction"]
        + e.terms["passes"] / CONSTANTS["pass_flops_per_s"]["jacobian_contraction"]
        + e.terms["contraction"] / CONSTANTS["matmul_flops_per_s"]
        + e.terms["traffic"] / CONSTANTS["bytes_per_s"]
    )
    assert e.seconds == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="'auto' has no cost model"):
        estimate(shape, "auto", 8, None, (10,), _axes((10,)), 4, CONSTANTS)


def test_calibration_data_covers_every_device_class():
    data = json.loads(cost_model.CALIBRATION.read_text())
    assert data["source"]
    for key, constants in data["constants"].items():
        device = key.partition("/")[2]
        assert device in ("cpu", "gpu"), key
        assert set(constants["overhead_s"]) == set(cost_model.METHODS)
        assert set(constants["pass_flops_per_s"]) == set(constants["per_layer_s"]) == set(cost_model.METHODS)
        assert constants["matmul_flops_per_s"] > 0 and constants["bytes_per_s"] > 0
        assert min(constants["overhead_s"].values()) >= 0 and min(constants["pass_flops_per_s"].values()) > 0
    assert cost_model.constants("a_plugin", "gpu") == data["constants"]["default/gpu"]
    assert cost_model.device_class("cuda:0") == "gpu" and cost_model.device_class("TFRT_CPU_0") == "cpu"
    assert cost_model.device_class("/job:localhost/replica:0/task:0/device:GPU:0") == "gpu"


def test_dense_orders_match_the_flops_of_each_order():
    axes = _axes((10,))
    orders = dense_orders(8, 8, 1, 64, 512, (10,), axes)
    # pairwise: (x1·x2) then (g1·g2ᵀ); per-example: Σ_s g_sᵀx_s, then contracted
    assert orders["pairwise"][1] == 2 * (64 * 100 * 512 + 64 * 64)
    assert orders["per_example"][1] == 2 * (16 * 10 * 512 * 64 + 64 * 100 * 512 * 64)
    assert orders["pairwise"][0] < orders["per_example"][0]


@pytest.mark.parametrize(
    ("text", "expected"), [(1000, 1000.0), ("2GB", 2e9), ("512 MiB", 512 * 2**20), ("1.5e3", 1500.0)]
)
def test_memory_budget_parsing(text, expected):
    assert memory.parse_budget(text) == expected


@pytest.mark.parametrize("bad", [0, -5, "lots", "2 parsecs", True, [1]])
def test_memory_budget_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        memory.parse_budget(bad)


def test_host_memory_is_known_here():
    free = memory.host_available()
    assert free is not None and free > 2**20


@pytest.fixture
def fd_model(monkeypatch):
    from tests.core.test_core import PLUGIN_DIR

    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    from ntkcore import registry

    registry._plugin_entry_points.cache_clear()
    registry._instance.cache_clear()
    from ntkcore_fd_backend import FDModel

    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(4, 6)), "w2": rng.normal(size=(6, 3))}
    yield FDModel(lambda p, x: np.tanh(x @ p["w1"]) @ p["w2"], params), rng.normal(size=(5, 4))
    registry._plugin_entry_points.cache_clear()
    registry._instance.cache_clear()
    sys.modules.pop("ntkcore_fd_backend", None)


def test_explain_without_layer_capture(fd_model):
    model, x = fd_model
    result = ntkcore.explain(model, x, backend="numpy_fd")
    assert list(result.estimates) == ["jacobian_contraction", "ntk_vector_products"]
    assert "cannot capture" in result.structured_unavailable and "structured: not a candidate" in str(result)
    assert result.choice in result.estimates
    kernel = ntkcore.ntk(model, x, backend="numpy_fd")  # auto, with the rough sizes
    assert kernel.shape == (5, 5, 3, 3)


def test_auto_refuses_an_impossible_budget(fd_model):
    model, x = fd_model
    with pytest.raises(ntkcore.MemoryBudgetError, match=r"predicted peaks are jacobian_contraction ~\d"):
        ntkcore.ntk(model, x, backend="numpy_fd", memory_budget="1 kB")
    assert math.isfinite(
        ntkcore.explain(model, x, backend="numpy_fd", memory_budget="1 kB").estimates["ntk_vector_products"].peak_bytes
    )
