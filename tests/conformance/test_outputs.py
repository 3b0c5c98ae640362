"""``output=`` and models with several outputs: a kernel per array of a tuple/list/dict output,
the same kernel as choosing that array with ``output=``; output objects refused with advice."""

from __future__ import annotations

import numpy as np
import pytest

import ntkcore
from tests.models.spec import inputs

RTOL = 1e-10  # float64: the same computation on the same array, up to summation order


def test_a_kernel_per_output_array(backend, zoo):
    built = zoo.multi_output()
    x1, x2 = inputs("mlp")
    kernels = ntkcore.ntk(built.model, x1, x2, **built.kwargs)
    assert set(kernels) == {"a", "b"} and len(kernels["b"]) == 2
    for output, kernel in (("a", kernels["a"]), (("b", 0), kernels["b"][0]), (("b", 1), kernels["b"][1])):
        chosen = ntkcore.ntk(built.model, x1, x2, output=output, **built.kwargs)
        assert zoo.is_native(kernel, "float64")
        np.testing.assert_allclose(zoo.to_numpy(kernel), zoo.to_numpy(chosen), rtol=RTOL, atol=1e-14)
    a = zoo.to_numpy(kernels["a"])
    np.testing.assert_allclose(zoo.to_numpy(kernels["b"][1]), 4 * a, rtol=RTOL, atol=1e-14)  # 2·a: 4× a's kernel
    by_function = ntkcore.ntk(built.model, x1, x2, output=lambda out: out["a"][:, :2], **built.kwargs)
    np.testing.assert_allclose(zoo.to_numpy(by_function), a[:, :, :2, :2], rtol=RTOL, atol=1e-14)


def test_output_on_every_entry_point(backend, zoo):
    built = zoo.multi_output()
    x1, _ = inputs("mlp")
    expected = zoo.to_numpy(ntkcore.ntk(built.model, x1, output="a", **built.kwargs))
    assert ntkcore.explain(built.model, x1, output="a", **built.kwargs).out_shape == (3,)
    nngp = ntkcore.nngp(built.model, x1, output="a", **built.kwargs)
    assert tuple(nngp.shape) == expected.shape
    op = ntkcore.ntk_operator(built.model, x1, output="a", **built.kwargs)
    np.testing.assert_allclose(op.matvec(np.ones(op.shape[0])), ntkcore.flatten(expected) @ np.ones(op.shape[0]))
    params = built.kwargs.get("params")
    lin = ntkcore.linearize(built.model, params, output="a")
    assert tuple(lin(zoo.to_native(x1, "float64")).shape) == (len(x1), 3)


def test_an_output_object_needs_output(backend, zoo):
    if zoo.object_output is None:
        pytest.skip(f"{backend} models return arrays or structures of them")
    built = zoo.object_output()
    x1, _ = inputs("mlp")
    with pytest.raises(TypeError, match=r"not an array: pass output= .*\(e\.g\. output='logits'\)"):
        ntkcore.ntk(built.model, x1, **built.kwargs)
    assert tuple(ntkcore.ntk(built.model, x1, output="logits", **built.kwargs).shape) == (len(x1), len(x1), 3, 3)


def test_an_unknown_output_key(backend, zoo):
    built = zoo.multi_output()
    with pytest.raises(ntkcore.OutputChoiceError, match=r"output='c': .* its keys are \['a', 'b'\]"):
        ntkcore.ntk(built.model, inputs("mlp")[0], output="c", **built.kwargs)
