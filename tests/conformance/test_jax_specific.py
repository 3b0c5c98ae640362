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
        compiled.append(set(map(id, ntkcore.compiled._COMPILED.values())))
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


@pytest.mark.skipif(importlib.util.find_spec("flax") is None, reason="flax not installed")
def test_factorize_flax_apply_keeps_batch_stats_constant(jax_zoo):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(
                nn.Dense(16, param_dtype=jnp.float64)(x)
            )
            return nn.Dense(3, param_dtype=jnp.float64)(jax.nn.relu(x))

    net = Net()
    x = jnp.asarray(inputs("mlp")[0])
    variables = jax.tree_util.tree_map(lambda a: a + 0.1, net.init(jax.random.PRNGKey(0), x))
    assert set(ntkcore.get_backend("jax").dense_layers(net.apply, variables)) == {
        "params.Dense_0.kernel",
        "params.Dense_1.kernel",
    }
    # V fixed at rank = out: the same function and kernel
    apply, params = ntkcore.factorize(
        net.apply, {"params.Dense_0.kernel": 16}, params=variables, layers=["params.Dense_0.kernel"], trainable="u"
    )
    assert params["params"]["Dense_0"]["kernel"]["u"].shape == (6, 16)
    np.testing.assert_allclose(apply(params, x), net.apply(variables, x), rtol=1e-12, atol=1e-12)
    k0, k1 = ntkcore.ntk(net.apply, x, params=variables), ntkcore.ntk(apply, x, params=params)
    np.testing.assert_allclose(k1, k0, rtol=1e-9, atol=1e-9 * float(jnp.abs(k0).max()))
    trained = list(ntkcore.get_backend("jax").prepare(apply, params).params)
    assert "params.Dense_0.kernel.u" in trained and not any(n.startswith("batch_stats") for n in trained)


def test_factorize_rewrites_every_use_of_the_weight(jax_zoo):
    """x·Wᵀ and W·h become two products through the rank; another use (a mean) gets U·V."""
    import warnings

    import jax.numpy as jnp

    def f(p, x):
        h = jnp.tanh(x @ p["a"].T)  # a is (out, in): contracted on its axis 1
        return (p["b"] @ h.T).T * jnp.mean(p["c"]) + h[:, :2] @ p["c"]

    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(rng.normal(size=s)) for k, s in (("a", (7, 5)), ("b", (3, 7)), ("c", (2, 3)))}
    x = jnp.asarray(rng.normal(size=(4, 5)))
    apply, new = ntkcore.factorize(f, {"a": 5, "b": 3, "c": 2}, params=params, layers=["a", "b", "c"])
    np.testing.assert_allclose(apply(new, x), f(params, x), rtol=1e-12, atol=1e-12)
    assert {k: (v["u"].shape, v["v"].shape) for k, v in new.items()} == {
        "a": ((7, 5), (5, 5)),
        "b": ((3, 3), (3, 7)),
        "c": ((2, 2), (2, 3)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ntkcore.StructuredFallbackWarning)  # c's mean: the exact fallback
        structured = ntkcore.ntk(apply, x, params=new, implementation="structured")
    expected = ntkcore.ntk(apply, x, params=new, implementation="jacobian_contraction")
    np.testing.assert_allclose(np.asarray(structured), np.asarray(expected), rtol=1e-10, atol=1e-12)
    # the dense products are dense layers of the factors: U and V of a and b take the dense rule
    layers = {layer.name: layer.rule for layer in ntkcore.explain(apply, x, params=new).layers}
    assert all(layers[name].startswith("dense rule") for name in ("a.u", "a.v", "b.u", "b.v")), layers


def test_flax_variables_through_any_function_train_params_only(jax_zoo):
    """A pytree with a top-level "params" collection trains only it, whatever function receives
    it (a lambda around model.apply included); trainable= chooses otherwise."""
    import flax.linen as nn
    import jax

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.BatchNorm(use_running_average=True)(nn.Dense(5)(x)))

    x1, x2 = inputs("mlp")
    model = Net()
    variables = model.init(jax.random.PRNGKey(0), x1)
    assert set(variables) == {"params", "batch_stats"}
    bound = np.asarray(ntkcore.ntk(model.apply, x1, x2, params=variables))
    wrapped = np.asarray(ntkcore.ntk(lambda v, x: model.apply(v, x), x1, x2, params=variables))
    np.testing.assert_allclose(wrapped, bound, rtol=1e-10)
    everything = {
        implementation: np.asarray(
            ntkcore.ntk(
                lambda v, x: model.apply(v, x), x1, x2, params=variables, trainable=bool, implementation=implementation
            )
        )
        for implementation in ("structured", "jacobian_contraction")
    }
    assert not np.allclose(everything["structured"], bound)
    # batch statistics as parameters: the mean is a bias, var + ε one too (float32 models)
    np.testing.assert_allclose(everything["structured"], everything["jacobian_contraction"], rtol=1e-5, atol=1e-6)


def test_nnx_module_passed_directly(jax_zoo):
    """θ = the nnx.Param variables; BatchNorm statistics and RNG state are constants."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(6, 5, rngs=rngs)
            self.norm = nnx.BatchNorm(5, use_running_average=True, rngs=rngs)
            self.out = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.norm(self.dense(x))))

    net = Net(nnx.Rngs(0))
    x1, x2 = inputs("mlp")
    graph, params, rest = nnx.split(net, nnx.Param, ...)
    expected = np.asarray(ntkcore.ntk(lambda p, x: nnx.merge(graph, p, rest)(x), x1, x2, params=params))
    for implementation in ("jacobian_contraction", "ntk_vector_products", "structured", "auto"):
        kernel = np.asarray(ntkcore.ntk(net, x1, x2, implementation=implementation))
        np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())  # float32
    names = ntkcore.get_backend("jax").prepare(net, None).params
    assert set(names) == {"dense.kernel", "dense.bias", "norm.scale", "norm.bias", "out.kernel", "out.bias"}
    with pytest.raises(TypeError, match="params= is not used for a Net module"):
        ntkcore.ntk(net, x1, params=params)
    assert jax.tree_util.tree_structure(nnx.split(net)[1]) is not None  # the module itself is left as it was


def test_equinox_module_reuses_its_compiled_kernel(jax_zoo):
    import equinox as eqx
    import jax

    from ntkcore import compiled

    mlp = eqx.nn.MLP(6, 2, 8, 2, key=jax.random.PRNGKey(0))
    x1, _ = inputs("mlp")
    ntkcore.ntk(mlp, x1)
    before = len(compiled._COMPILED)
    for _ in range(3):
        ntkcore.ntk(mlp, x1)
    assert len(compiled._COMPILED) == before, "a repeated ntk() call on the same module compiled again"


def test_haiku_models_as_users_apply_them(jax_zoo):
    """``hk.transform``'s apply with params= (its rng handled), ``hk.transform_with_state``'s with
    state= (a constant, e.g. BatchNorm statistics in inference mode)."""
    hk = pytest.importorskip("haiku")
    import jax
    import jax.numpy as jnp

    x1, x2 = inputs("mlp")

    def mlp(x):
        return hk.nets.MLP([8, 3])(x)

    def normed(x, is_training=False):
        h = hk.Linear(8)(x)
        return hk.Linear(3)(jnp.tanh(hk.BatchNorm(True, True, 0.9)(h, is_training=is_training)))

    plain, stateful = hk.transform(mlp), hk.transform_with_state(normed)
    params = plain.init(jax.random.PRNGKey(0), x1)
    sparams, state = stateful.init(jax.random.PRNGKey(1), x1, is_training=True)
    cases = [
        (plain.apply, params, {}, lambda p, x: plain.apply(p, None, x)),
        (stateful.apply, sparams, {"state": state}, lambda p, x: stateful.apply(p, state, None, x)[0]),
    ]
    for apply, p, extra, f in cases:
        expected = _reference(jax, f, p, x1, x2)
        for implementation in ("jacobian_contraction", "ntk_vector_products", "structured"):
            kernel = np.asarray(ntkcore.ntk(apply, x1, x2, params=p, implementation=implementation, **extra))
            np.testing.assert_allclose(kernel, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    lin = ntkcore.linearize(stateful.apply, sparams, state=state)  # the linearised model takes state= too
    moved = jax.tree_util.tree_map(lambda a: a + 0.01, sparams)
    f0 = stateful.apply(sparams, state, None, x1)[0]
    _, tangent = jax.jvp(
        lambda p: stateful.apply(p, state, None, x1)[0],
        (sparams,),
        (jax.tree_util.tree_map(lambda a: 0.01 + 0 * a, sparams),),
    )
    np.testing.assert_allclose(np.asarray(lin(x1, params=moved)), np.asarray(f0 + tangent), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(lin.model(x1, params=moved)), np.asarray(stateful.apply(moved, state, None, x1)[0]), rtol=1e-12
    )
    with pytest.raises(TypeError, match="pass its state with state="):
        ntkcore.ntk(stateful.apply, x1, params=sparams)
    with pytest.raises(TypeError, match="state= is for a haiku transform_with_state"):
        ntkcore.ntk(plain.apply, x1, params=params, state=state)


def _library_models() -> dict:
    """name -> (model, params or None, x): float64 models from flax nnx and linen, equinox and
    haiku, built as their users build them, from layers ntkcore has rules for."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)))
    found = {}
    if importlib.util.find_spec("flax") is not None:
        import flax.linen as nn
        from flax import nnx

        class Nnx(nnx.Module):
            def __init__(self, rngs):
                f64 = {"param_dtype": jnp.float64, "rngs": rngs}
                self.dense = nnx.Linear(4, 6, **f64)
                self.ln = nnx.LayerNorm(6, **f64)
                self.rms = nnx.RMSNorm(6, **f64)
                self.conv = nnx.Conv(6, 6, kernel_size=(3,), **f64)
                self.bn = nnx.BatchNorm(6, use_running_average=True, **f64)
                self.out = nnx.Linear(6, 2, **f64)

            def __call__(self, x):
                h = self.rms(jnp.tanh(self.ln(self.dense(x))))
                return self.out(jnp.tanh(self.bn(self.conv(h)))).mean(axis=1)

        net = Nnx(nnx.Rngs(0))
        for norm in (net.ln, net.rms):  # γ ≠ 1, so that a wrong scale term shows
            norm.scale[...] = norm.scale[...] + 0.3
        found["nnx"] = (net, None, x)

        class Linen(nn.Module):
            @nn.compact
            def __call__(self, x):
                f64 = {"param_dtype": jnp.float64}
                h = nn.LayerNorm(**f64)(nn.Dense(6, **f64)(x))
                h = nn.GroupNorm(num_groups=2, **f64)(nn.RMSNorm(**f64)(jnp.tanh(h)))
                return nn.Dense(2, **f64)(jnp.tanh(h)).mean(axis=1)

        linen = Linen()
        variables = linen.init(jax.random.PRNGKey(0), x)
        variables = jax.tree_util.tree_map(lambda a: a + 0.3, variables)
        found["linen"] = (linen.apply, variables, x)
    if importlib.util.find_spec("equinox") is not None:
        import equinox as eqx

        keys = jax.random.split(jax.random.PRNGKey(1), 2)
        layers = [eqx.nn.Linear(4, 6, key=keys[0]), eqx.nn.LayerNorm(6), eqx.nn.Linear(6, 2, key=keys[1])]
        mlp = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) + 0.1, layers)

        def apply(model, x):
            per_token = lambda t: model[2](jnp.tanh(model[1](model[0](t))))  # noqa: E731
            return jax.vmap(jax.vmap(per_token))(x).mean(axis=1)

        found["equinox"] = (apply, mlp, x)
    if importlib.util.find_spec("haiku") is not None:
        import haiku as hk

        def forward(x):
            h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(hk.Linear(6)(x))
            return hk.Linear(2)(jnp.tanh(h)).mean(axis=1)

        transformed = hk.transform(forward)
        params = jax.tree_util.tree_map(lambda a: a + 0.3, transformed.init(jax.random.PRNGKey(2), x))
        found["haiku"] = (transformed.apply, params, x)
    return found


def test_jax_libraries_are_exact_and_structured(jax_zoo):
    """Every implementation equals jax's own float64 autodiff on nnx, linen, equinox and haiku
    models, and structured derivatives cover all of their parameters (norm scales included)."""
    import warnings

    import jax

    models = _library_models()
    if not models:
        pytest.skip("no JAX library installed")
    for name, (model, params, x) in models.items():
        prepared = ntkcore.get_backend("jax").prepare(model, params)
        jac = jax.jacrev(prepared.apply)(prepared.params, x)
        flat = {k: np.asarray(j).reshape(*j.shape[:2], -1) for k, j in jac.items()}
        expected = reference_kernel(flat, output_ndim=2)
        for implementation in ("jacobian_contraction", "ntk_vector_products", "structured", "auto"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kernel = np.asarray(ntkcore.ntk(model, x, params=params, implementation=implementation))
            fallback = [str(w.message) for w in caught if issubclass(w.category, ntkcore.StructuredFallbackWarning)]
            assert not fallback, f"{name}: {fallback}"
            # float64 on both sides: 1e-10 of the largest entry is far above rounding, far below a missing term
            np.testing.assert_allclose(kernel, expected, rtol=0, atol=1e-10 * np.abs(expected).max(), err_msg=name)
