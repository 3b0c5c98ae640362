"""JAX models come as functions over pytrees: flax ``apply`` and equinox modules."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import ntkcore
from ntkcore.testing import reference_kernel
from tests.models.spec import inputs


@pytest.fixture
def jax_zoo(active_backends):
    if "jax" not in active_backends:
        pytest.skip("jax not under test")
    from tests.models import jax_models

    return jax_models


def _reference(jax, f, params, x1, x2):
    jacs = [jax.tree_util.tree_leaves(jax.jacrev(f)(params, x)) for x in (x1, x2)]
    j1 = {str(i): np.asarray(j).reshape(*j.shape[:2], -1) for i, j in enumerate(jacs[0])}
    j2 = {str(i): np.asarray(j).reshape(*j.shape[:2], -1) for i, j in enumerate(jacs[1])}
    return reference_kernel(j1, j2, output_ndim=2)


def test_params_missing_for_jax_function(jax_zoo):
    built = jax_zoo.build("mlp", "float64")
    x1, _ = inputs("mlp")
    with pytest.raises(TypeError, match=r"params= is required for a JAX function"):
        ntkcore.ntk(built.model, jax_zoo.to_native(x1, "float64"))


@pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax not installed")
def test_flax_apply_with_batch_stats(jax_zoo):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, param_dtype=jnp.float64)(x)
            x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(x)
            return nn.Dense(3, param_dtype=jnp.float64)(nn.relu(x))

    x1, x2 = (jnp.asarray(a) for a in inputs("mlp"))
    model = Net()
    variables = model.init(jax.random.PRNGKey(0), x1)
    variables = {
        **variables,
        "batch_stats": jax.tree_util.tree_map(lambda a: (a + 0.3).astype(jnp.float64), variables["batch_stats"]),
    }
    kernel = ntkcore.ntk(model.apply, x1, x2, params=variables)

    def f(p, x):
        return model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)

    np.testing.assert_allclose(np.asarray(kernel), _reference(jax, f, variables["params"], x1, x2), rtol=1e-10)


@pytest.mark.skipif(importlib.util.find_spec("equinox") is None, reason="equinox not installed")
def test_equinox_module_as_model(jax_zoo):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    model = eqx.nn.MLP(6, 3, 8, 2, key=jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model)
    x1, x2 = (jnp.asarray(a) for a in inputs("mlp"))
    kernel = ntkcore.ntk(model, x1, x2)
    dynamic, static = eqx.partition(model, eqx.is_inexact_array)

    def f(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    np.testing.assert_allclose(np.asarray(kernel), _reference(jax, f, dynamic, x1, x2), rtol=1e-10)


def test_compiled_kernels_are_reused_only_when_valid(jax_zoo):
    import jax
    import jax.numpy as jnp

    def f(p, x):
        return p["scale"] * jnp.tanh(x @ p["w"])  # the integer leaf is a constant, not a parameter

    x1, x2 = (jnp.asarray(a) for a in inputs("mlp"))
    w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)))
    three = jnp.asarray(3)
    compiled = []
    for params in ({"w": w, "scale": jnp.asarray(2)}, {"w": w, "scale": three}, {"w": 2 * w, "scale": three}):
        kernel = ntkcore.ntk(f, x1, x2, params=params)
        compiled.append(set(map(id, ntkcore.api._COMPILED.values())))
        scale = params["scale"]
        expected = _reference(jax, lambda w_, x, s=scale: f({"w": w_, "scale": s}, x), params["w"], x1, x2)
        np.testing.assert_allclose(np.asarray(kernel), expected, rtol=1e-10)
    assert compiled[2] == compiled[1] != compiled[0], "same constants reuse the kernel, new constants do not"


def test_output_without_batch_axis(jax_zoo):
    import jax.numpy as jnp

    x = jnp.asarray(inputs("mlp")[0])
    with pytest.raises(ValueError, match=r"model output of shape \(\) has no leading batch axis"):
        ntkcore.ntk(lambda p, x: jnp.sum(x @ p), x, params=jnp.ones((6, 2)))


def test_weight_used_as_is_and_transposed(jax_zoo):
    """x·W then h·Wᵀ: the two calls' entries are laid out differently, so W falls back, exactly."""
    import jax.numpy as jnp

    def f(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"].T) @ p["head"]

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 5))), "head": jnp.asarray(rng.normal(size=(5, 2)))}
    x1, x2 = jnp.asarray(rng.normal(size=(3, 5))), jnp.asarray(rng.normal(size=(2, 5)))
    with pytest.warns(ntkcore.StructuredFallbackWarning, match=r"'w' is used several times"):
        kernel = ntkcore.ntk(f, x1, x2, params=params, implementation="structured")
    expected = ntkcore.ntk(f, x1, x2, params=params, implementation="jacobian_contraction")
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(expected), rtol=1e-10, atol=1e-12)
