"""Tiled kernels (``batch_size=``) and kernels written to disk (``out=``) on every backend:
they equal the untiled kernel for every axes option, x2=None or given, N not a multiple of
the tile size; a store holding another kernel is refused and left untouched.

Tolerance: float64, 1e-12 relative to the largest entry — a tile is the same computation on
fewer examples, so only summation order can differ.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import ntkcore
from ntkcore.stores import StoreMismatchError
from tests.conformance.test_kernels import AXES, _pair, assert_close
from tests.models.spec import inputs


def _kernel(zoo, case, x1, x2, axes, **options):
    built = zoo.build(case, "float64")
    native2 = None if x2 is None else zoo.to_native(x2, "float64")
    kernel = ntkcore.ntk(built.model, zoo.to_native(x1, "float64"), native2, **AXES[axes], **built.kwargs, **options)
    return kernel


@pytest.mark.filterwarnings("ignore::ntkcore.StructuredFallbackWarning")
@pytest.mark.parametrize("x2_mode", ["x2", "self"])
@pytest.mark.parametrize("axes", list(AXES))
@pytest.mark.parametrize("case", ["mlp", "multi_output"])
def test_tiled_equals_untiled(backend, zoo, case, axes, x2_mode, tmp_path):
    x1, x2 = _pair(case, axes, x2_mode)
    expected = zoo.to_numpy(_kernel(zoo, case, x1, x2, axes))
    for size in (1, 3):  # N1 = 4, N2 = 3: a remainder tile either way
        tiled = _kernel(zoo, case, x1, x2, axes, batch_size=size)
        assert zoo.is_native(tiled, "float64"), "a tiled kernel is the caller's framework array"
        assert_close(zoo.to_numpy(tiled), expected, 1e-12)
    for out in ("k.zarr", "k.npy"):
        stored = _kernel(zoo, case, x1, x2, axes, batch_size=3, out=tmp_path / out)
        assert_close(np.asarray(stored[...]), expected, 1e-12)


def test_store_refuses_another_kernel_and_is_left_untouched(backend, zoo, tmp_path):
    x1 = inputs("mlp")[0]
    out = tmp_path / "kernel.zarr"
    first = np.asarray(_kernel(zoo, "mlp", x1, None, "full", batch_size=2, out=out)[...])
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for inputs_, axes, size in ((x1 + 1.0, "full", 2), (x1, "trace", 2), (x1, "full", 3)):  # inputs, options
        with pytest.raises(StoreMismatchError, match=r"already holds a kernel of other .* nothing was written"):
            _kernel(zoo, "mlp", inputs_, None, axes, out=out, batch_size=size)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files
    again = _kernel(zoo, "mlp", x1, None, "full", batch_size=2, out=out)  # same call: nothing to do
    np.testing.assert_array_equal(np.asarray(again[...]), first)
    replaced = _kernel(zoo, "mlp", x1 + 1.0, None, "full", batch_size=2, out=out, overwrite=True)
    assert_close(np.asarray(replaced[...]), zoo.to_numpy(_kernel(zoo, "mlp", x1 + 1.0, None, "full")), 1e-12)
    assert os.access(out, os.R_OK)


def test_other_weights_are_refused(backend, zoo, tmp_path):
    x1, _ = inputs("mlp")
    out = tmp_path / "kernel.npy"
    _kernel(zoo, "mlp", x1, None, "full", batch_size=2, out=out)
    other = zoo.build("lowrank", "float64")  # other parameters altogether
    with pytest.raises(StoreMismatchError, match="other parameters"):
        ntkcore.ntk(other.model, zoo.to_native(x1, "float64"), batch_size=2, out=out, **other.kwargs)


def test_bad_tile_options(backend, zoo, tmp_path):
    built = zoo.build("mlp", "float64")
    x1 = zoo.to_native(inputs("mlp")[0], "float64")
    with pytest.raises(ValueError, match="batch_size must be a positive number of examples"):
        ntkcore.ntk(built.model, x1, batch_size=0, **built.kwargs)
    with pytest.raises(ValueError, match=r"out=.*expected a path ending in \.zarr .* or \.npy"):
        ntkcore.ntk(built.model, x1, batch_size=2, out=tmp_path / "kernel.h5", **built.kwargs)


def test_progress_bar(backend, zoo, capsys):
    built = zoo.build("mlp", "float64")
    x1 = zoo.to_native(inputs("mlp")[0], "float64")
    ntkcore.ntk(built.model, x1, batch_size=1, **built.kwargs)  # not a terminal: quiet
    assert "tile" not in capsys.readouterr().err
    ntkcore.ntk(built.model, x1, batch_size=1, progress=True, **built.kwargs)
    err = capsys.readouterr().err
    assert "10/10" in err and "tile" in err and "entries_per_s" in err


def test_auto_tiles_when_the_whole_kernel_does_not_fit(backend, zoo, capsys):
    built = zoo.build("mlp", "float64")
    x1 = zoo.to_native(inputs("mlp")[0], "float64")
    whole = ntkcore.explain(built.model, x1, **built.kwargs)
    kernel_bytes = 8 * int(np.prod(whole.kernel_shape))
    one = ntkcore.explain(built.model, x1[:1], x1[:1], **built.kwargs)  # a tile of one example a side
    budget = kernel_bytes + min(e.peak_bytes for e in one.estimates.values())
    assert budget < min(e.peak_bytes for e in whole.estimates.values())  # the kernel fits; no method at once
    tiled = ntkcore.ntk(built.model, x1, memory_budget=budget, progress=True, **built.kwargs)
    assert "tile" in capsys.readouterr().err
    assert_close(zoo.to_numpy(tiled), zoo.to_numpy(ntkcore.ntk(built.model, x1, **built.kwargs)), 1e-12)
    with pytest.raises(ntkcore.MemoryBudgetError, match="the kernel itself takes"):
        ntkcore.ntk(built.model, x1, memory_budget=kernel_bytes / 2, **built.kwargs)
