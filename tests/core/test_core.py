"""The core on its own: no framework, numpy and array-api-strict, a plugin adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ntkcore
from ntkcore import registry
from ntkcore.axes import KernelAxes
from ntkcore.implementations import Implementation
from ntkcore.testing import reference_kernel

PLUGIN_DIR = Path(__file__).parent / "plugin"
FRAMEWORKS = ("jax", "jaxlib", "torch", "tensorflow", "keras", "flax", "equinox")


def _jacobians(seed: int, n: int, out: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(n, *out, 4, 3)), "b": rng.normal(size=(n, *out, 3))}


def _flat(jac: dict, ndim: int) -> dict:
    return {k: v.reshape(*v.shape[:ndim], -1) for k, v in jac.items()}


ISOLATION_SCRIPT = """
import json, sys
import numpy as np
import ntkcore
from ntkcore_fd_backend import FDModel
rng = np.random.default_rng(0)
jac = {"w": rng.normal(size=(3, 2, 5))}
k = ntkcore.ntk_from_jacobians(jac, output_ndim=2, trace_axes=(-1,))
m = ntkcore.flatten(ntkcore.ntk_from_jacobians(jac, output_ndim=2))
model = FDModel(lambda p, x: np.tanh(x @ p["w"]), {"w": rng.normal(size=(4, 2))})
kernel = ntkcore.ntk(model, rng.normal(size=(3, 4)), implementation="ntk_vector_products")
gp = ntkcore.nngp(model, rng.normal(size=(3, 4)))
import ntkcore.plot  # the analysis tools too: operator, Lanczos, predictions, plots
op = ntkcore.ntk_operator(model, rng.normal(size=(3, 4)))
assert ntkcore.spectrum(op, k=1).lambda_max > 0
ntkcore.gd_mse(m, rng.normal(size=(6, 1)), 1.0)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in FRAMEWORKS)
print(json.dumps({"loaded": loaded, "shapes": [k.shape, m.shape, kernel.shape, gp.shape, op.shape],
                  "type": type(kernel).__module__}))
"""


def test_import_and_numpy_path_pull_in_no_framework():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}
    script = f"FRAMEWORKS = {FRAMEWORKS!r}\n" + ISOLATION_SCRIPT
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], f"importing/using ntkcore imported {result['loaded']}"
    assert result["shapes"] == [[3, 3], [6, 6], [3, 3, 2, 2], [3, 3, 2, 2], [6, 6]]
    assert result["type"] == "numpy"


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    registry._plugin_entry_points.cache_clear()
    registry._instance.cache_clear()
    yield
    registry._plugin_entry_points.cache_clear()
    registry._instance.cache_clear()


def test_plugin_adapter_registered_by_entry_point(plugin):
    from ntkcore_fd_backend import FDModel

    assert "numpy_fd" in ntkcore.known_backends()
    rng = np.random.default_rng(1)
    w1, w2 = rng.normal(size=(4, 5)), rng.normal(size=(5, 2))
    x1, x2 = rng.normal(size=(3, 4)), rng.normal(size=(2, 4))

    def f(p, x):
        return np.tanh(x @ p["w1"]) @ p["w2"]

    def analytic(x):  # df/dw1[n, o, i, j] = x_i (1 - h_j²) w2[j, o]; df/dw2[n, o, j, o'] = h_j δ(o, o')
        h = np.tanh(x @ w1)
        d1 = np.einsum("ni,nj,jo->noij", x, 1 - h**2, w2)
        d2 = np.einsum("nj,op->nojp", h, np.eye(2))
        return {"w1": d1.reshape(len(x), 2, -1), "w2": d2.reshape(len(x), 2, -1)}

    expected = reference_kernel(analytic(x1), analytic(x2), output_ndim=2)
    model = FDModel(f, {"w1": w1, "w2": w2})
    for implementation in ("jacobian_contraction", "ntk_vector_products"):
        kernel = ntkcore.ntk(model, x1, x2, implementation=implementation, backend="numpy_fd")
        np.testing.assert_allclose(kernel, expected, rtol=1e-7, atol=1e-8)  # finite differences: ~1e-9


@pytest.mark.parametrize(
    "axes",
    [
        {},
        {"trace_axes": (-1,)},
        {"diagonal_axes": (0,)},
        {"diagonal_axes": (1,)},
        {"trace_axes": (1,), "diagonal_axes": (0, 2)},
    ],
)
def test_ntk_from_jacobians_numpy(axes):
    j1, j2 = _jacobians(0, 3, (2, 4)), _jacobians(1, 3, (2, 4))
    kernel = ntkcore.ntk_from_jacobians(j1, j2, output_ndim=3, **axes)
    expected = reference_kernel(_flat(j1, 3), _flat(j2, 3), output_ndim=3, **axes)
    assert isinstance(kernel, np.ndarray)
    np.testing.assert_allclose(kernel, expected, rtol=1e-12)


def test_ntk_from_jacobians_array_api_strict():
    xp = pytest.importorskip("array_api_strict")
    j1, j2 = _jacobians(0, 3, (2,)), _jacobians(1, 2, (2,))
    kernel = ntkcore.ntk_from_jacobians(
        {k: xp.asarray(v) for k, v in j1.items()},
        {k: xp.asarray(v) for k, v in j2.items()},
        output_ndim=2,
        trace_axes=(-1,),
    )
    assert type(kernel).__module__.startswith("array_api_strict")
    expected = reference_kernel(_flat(j1, 2), _flat(j2, 2), output_ndim=2, trace_axes=(-1,))
    np.testing.assert_allclose(np.asarray(kernel), expected, rtol=1e-12)
    flat = ntkcore.flatten(ntkcore.ntk_from_jacobians({k: xp.asarray(v) for k, v in j1.items()}, output_ndim=2))
    assert tuple(flat.shape) == (6, 6)


def test_flatten_layout():
    kernel = np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    matrix = ntkcore.flatten(kernel)
    assert matrix.shape == (8, 12)
    assert matrix[1 * 4 + 2, 2 * 4 + 3] == kernel[1, 2, 2, 3]
    with pytest.raises(ValueError, match="without diagonal_axes"):
        ntkcore.flatten(np.zeros((3, 4, 4)))


def test_kernel_shapes_of_the_readme_example():
    shape = (5, 7, 3)  # f(x) of shape (N, T, O)
    assert KernelAxes.create((), (), shape).kernel_shape(shape, (2, 7, 3)) == (5, 2, 7, 3, 7, 3)
    assert KernelAxes.create((-1,), (), shape).kernel_shape(shape, (2, 7, 3)) == (5, 2, 7, 7)
    assert KernelAxes.create((), (1,), shape).kernel_shape(shape, (2, 7, 3)) == (5, 2, 7, 3, 3)
    assert KernelAxes.create((-1,), (0,), shape).kernel_shape(shape, shape) == (5, 7, 7)


@pytest.mark.parametrize(
    ("trace", "diagonal", "message"),
    [
        ((3,), (), "trace_axes contains axis 3, out of range"),
        ((), (-4,), "diagonal_axes contains axis -4, out of range"),
        ((1,), (1,), "axis 1 is in both"),
        ((0,), (), "may not contain the batch axis 0"),
        ((1, -2), (), "names axis 1 twice"),
        (("x",), (), "must contain ints"),
    ],
)
def test_axes_errors(trace, diagonal, message):
    with pytest.raises((ValueError, TypeError), match=message):
        KernelAxes.create(trace, diagonal, (5, 7, 3))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend='mxnet' is not known; expected one of \['jax', 'torch'"):
        ntkcore.ntk(lambda p, x: x, np.ones((2, 2)), params={"w": np.ones(2)}, backend="mxnet")


def test_backend_named_but_not_installed(monkeypatch):
    monkeypatch.setitem(registry.BUILTIN, "ghost", ("ghost_framework_that_is_not_installed", "x:Y"))
    with pytest.raises(ImportError, match="needs the 'ghost_framework_that_is_not_installed' package"):
        ntkcore.get_backend("ghost")


def test_backend_cannot_be_inferred():
    with pytest.raises(TypeError, match=r"could not infer the framework .* Pass backend="):
        ntkcore.ntk(lambda p, x: x, np.ones((2, 2)), params={"w": np.ones(2)})


def test_implementation_names():
    assert Implementation.parse("NTK_vector_products") is Implementation.NTK_VECTOR_PRODUCTS
    assert Implementation.parse(Implementation.AUTO) is Implementation.AUTO
    with pytest.raises(ValueError, match="implementation=3 is not known"):
        Implementation.parse(3)
