"""Each structure rule alone, in numpy, against its layer's explicit Jacobians contracted.

Random shapes and axes (hypothesis); float64, tolerance 1e-10 relative to the kernel's
largest entry (a few hundred products per entry, rounding near 1e-15).
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ntkcore.axes import KernelAxes  # noqa: E402
from ntkcore.rules import affine, conv, dense, embedding, tied  # noqa: E402
from ntkcore.testing import reference_kernel  # noqa: E402

xp = pytest.importorskip("array_api_compat").array_namespace(np.empty(0))


@st.composite
def layouts(draw):
    n1, n2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    out = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    s, n_in, f = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ndim = 1 + len(out)
    option = draw(st.sampled_from(["full", "trace", "diag0", "diag_last", "both"]))
    trace = (-1,) if option in ("trace", "both") else ()
    diagonal = {"diag0": (0,), "both": (0,), "diag_last": (ndim - 1,)}.get(option, ())
    if 0 in diagonal:
        n2 = n1
    if diagonal == (ndim - 1,) and ndim == 1:
        diagonal = ()
    seed = draw(st.integers(0, 2**16))
    return n1, n2, out, s, n_in, f, trace, diagonal, seed


def _check(actual, j1, j2, out, trace, diagonal):
    expected = reference_kernel(j1, j2, output_ndim=1 + len(out), trace_axes=trace, diagonal_axes=diagonal)
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= 1e-10 * max(np.max(np.abs(expected)), 1e-300)


def _axes(n1, out, trace, diagonal):
    return KernelAxes.create(trace, diagonal, (n1, *out))


@settings(max_examples=40, deadline=None)
@given(layouts(), st.sampled_from([None, "pairwise", "per_example"]), st.sampled_from(["both", "weight", "bias"]))
def test_dense(layout, order, which):
    n1, n2, out, s, n_in, f, trace, diagonal, seed = layout
    rng = np.random.default_rng(seed)
    roles = {"weight", "bias"} if which == "both" else {which}
    x = [rng.normal(size=(n, s, n_in)) for n in (n1, n2)]
    g = [rng.normal(size=(n, *out, s, f)) for n in (n1, n2)]
    jac = []
    for xi, gi in zip(x, g):
        j = {}
        if "weight" in roles:  # ∂f/∂W[i, f] = Σ_s g[.., s, f] x[s, i]
            w = np.einsum("n...sf,nsi->n...if", gi, xi)
            j["weight"] = w.reshape(*w.shape[:-2], -1)
        if "bias" in roles:
            j["bias"] = gi.sum(axis=-2)
        jac.append(j)
    actual = dense.kernel(xp, x[0], g[0], x[1], g[1], _axes(n1, out, trace, diagonal), roles, order=order)
    _check(actual, jac[0], jac[1], out, trace, diagonal)
    # per-example gradients in the (out, in) layout of a torch weight
    gradients = dense.gradients(xp, x[0], g[0], roles)
    if "weight" in roles:
        w = np.einsum("n...sf,nsi->n...fi", g[0], x[0])
        np.testing.assert_allclose(gradients["weight"], w.reshape(*w.shape[:-2], -1), rtol=1e-12, atol=1e-12)
    if "bias" in roles:
        np.testing.assert_allclose(gradients["bias"], jac[0]["bias"], rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(layouts())
def test_affine(layout):
    n1, n2, out, s, _, f, trace, diagonal, seed = layout
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(n, s, f)) for n in (n1, n2)]
    g = [rng.normal(size=(n, *out, s, f)) for n in (n1, n2)]
    jac = [{"scale": np.einsum("n...sf,nsf->n...f", gi, xi), "shift": gi.sum(axis=-2)} for xi, gi in zip(x, g)]
    actual = affine.kernel(xp, x[0], g[0], x[1], g[1], _axes(n1, out, trace, diagonal), {"scale", "shift"})
    _check(actual, jac[0], jac[1], out, trace, diagonal)
    for role, gradient in affine.gradients(xp, x[0], g[0], {"scale", "shift"}).items():
        np.testing.assert_allclose(gradient, jac[0][role], rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(layouts(), st.integers(2, 5))
def test_embedding(layout, vocabulary):
    n1, n2, out, s, _, f, trace, diagonal, seed = layout
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocabulary, size=(n, s)) for n in (n1, n2)]
    g = [rng.normal(size=(n, *out, s, f)) for n in (n1, n2)]
    jac = []
    for ii, gi in zip(ids, g):  # ∂f/∂E[v, f] = Σ_s g[.., s, f] [id_s = v]
        one_hot = np.eye(vocabulary)[ii]
        t = np.einsum("n...sf,nsv->n...vf", gi, one_hot)
        jac.append({"table": t.reshape(*t.shape[:-2], -1)})
    actual = embedding.kernel(xp, ids[0], g[0], ids[1], g[1], _axes(n1, out, trace, diagonal), {"table"})
    _check(actual, jac[0], jac[1], out, trace, diagonal)
    gradient = embedding.gradients(xp, ids[0], g[0], {"table"}, {"table": (vocabulary, f)})["table"]
    np.testing.assert_allclose(gradient, jac[0]["table"], rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    layouts(),
    st.integers(1, 3),
    st.sampled_from([None, "pairwise", "per_example"]),
    st.sampled_from(["both", "weight", "bias"]),
)
def test_conv(layout, groups, order, which):
    """Patches x (N, S, G, K) and g (N, *out, S, G·F): per group, a dense layer on the patches."""
    n1, n2, out, s, k, f, trace, diagonal, seed = layout
    roles = {"weight", "bias"} if which == "both" else {which}
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(n, s, groups, k)) for n in (n1, n2)]
    g = [rng.normal(size=(n, *out, s, groups * f)) for n in (n1, n2)]
    jac = []
    for xi, gi in zip(x, g):  # ∂f/∂W[c, f, k] = Σ_s g[.., s, c·F + f] patch[s, c, k]
        grouped = gi.reshape(*gi.shape[:-1], groups, f)
        w = np.einsum("n...scf,nsck->n...cfk", grouped, xi)
        both = {"weight": w.reshape(*w.shape[:-3], -1), "bias": gi.sum(axis=-2)}
        jac.append({role: both[role] for role in roles})
    actual = conv.kernel(xp, x[0], g[0], x[1], g[1], _axes(n1, out, trace, diagonal), roles, order=order)
    _check(actual, jac[0], jac[1], out, trace, diagonal)


@settings(max_examples=30, deadline=None)
@given(layouts(), st.integers(1, 3), st.integers(1, 5), st.sampled_from(["both", "weight"]))
def test_conv_kronecker_sketch_columns(layout, groups, c, which):
    """A Kronecker-structured sketch column of a convolution's weight is s⊗r (s over the G·F
    output channels, r over a patch's K inputs, shared by the groups): the projection from the
    patches equals the explicit per-example gradient times that column; a bias keeps its own
    signs. Forced where :func:`conv.kronecker_pays` would decline (sizes this small)."""
    n1, _, out, s, k, f, _, _, seed = layout
    roles = {"weight", "bias"} if which == "both" else {"weight"}
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n1, s, groups, k))
    g = rng.normal(size=(n1, *out, s, groups * f))
    signs = {"weight": [rng.choice([-1.0, 1.0], size=(groups * f, c)), rng.choice([-1.0, 1.0], size=(k, c))]}
    if "bias" in roles:
        signs["bias"] = [rng.choice([-1.0, 1.0], size=(groups * f, c))]
    shapes = {"weight": (groups * f, 1, k), "bias": (groups * f,)}
    shapes = {role: shapes[role] for role in roles}
    actual = conv.RULE.project(xp, x, g, shapes, signs)
    w = np.einsum("n...scf,nsck->n...cfk", g.reshape(*g.shape[:-1], groups, f), x)  # (N, *out, G, F, K)
    column = np.einsum("cj,kj->ckj", *signs["weight"]).reshape(groups, f, k, c)
    expected = np.einsum("n...gfk,gfkj->n...j", w, column)
    if "bias" in roles:
        expected = expected + g.sum(axis=-2) @ signs["bias"][0]
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_conv_kronecker_sketch_where_positions_are_few():
    """Kronecker columns for a CNN's deep layers (few positions, many weights), plain columns on
    the gradient for its first ones; the factors follow."""
    assert conv.kronecker_pays(16, 9 * 512, 512, 1) and not conv.kronecker_pays(1024, 27, 64, 1)
    deep, early = np.zeros((2, 16, 1, 9 * 512)), np.zeros((2, 10, 1024, 64))
    assert conv.RULE.sketch_factors({"weight": (512, 512, 3, 3)}, deep, np.zeros((2, 10, 16, 512))) == {
        "weight": (512, 9 * 512)
    }
    assert conv.RULE.sketch_factors({"weight": (64, 3, 3, 3)}, np.zeros((2, 1024, 1, 27)), early) == {
        "weight": (64 * 27,)
    }


def test_conv_order_follows_positions_and_weights():
    """The pairwise order where positions are few and weights many (a CNN's deep layers), the
    per-example gradients where positions are many and weights few (its first layers)."""
    axes = KernelAxes.create((), (), (8, 10))
    deep = conv.orders(8, 8, 1, 9 * 512, 512, 1, (10,), axes)  # 3×3, 512 → 512 channels at 1×1
    early = conv.orders(8, 8, 16 * 16, 27, 64, 1, (10,), axes)  # 3×3, 3 → 64 channels at 16×16
    depthwise = conv.orders(8, 8, 4, 9, 512, 512, (10,), axes)  # 3×3 depthwise at 2×2
    assert deep["pairwise"][0] < deep["per_example"][0]
    assert early["per_example"][0] < early["pairwise"][0]
    assert depthwise["per_example"][0] < depthwise["pairwise"][0]


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(2, 5), st.integers(1, 4))
def test_tied_cross_terms(layout, vocabulary, t):
    """The cross terms of a table W (V, d) read by an embedding and multiplied by a dense layer:
    ⟨Σ_s g1_s⊗x1_s, Σ_t onehot(id2_t)⊗e2_t⟩ and its mirror, against both per-example gradients
    formed in the table's layout and contracted (padding ids, -1, have no gradient)."""
    n1, n2, out, s, d, _, trace, diagonal, seed = layout
    rng = np.random.default_rng(seed)
    g = [rng.normal(size=(n, *out, s, vocabulary)) for n in (n1, n2)]
    x = [rng.normal(size=(n, s, d)) for n in (n1, n2)]
    ids = [rng.integers(-1, vocabulary, size=(n, t)) for n in (n1, n2)]
    e = [rng.normal(size=(n, *out, t, d)) for n in (n1, n2)]
    dense_grads = [np.einsum("n...sv,nsd->n...vd", gi, xi) for gi, xi in zip(g, x)]
    onehot = [np.eye(vocabulary + 1)[ii][..., :vocabulary] for ii in ids]  # id -1 -> the dropped last row
    table_grads = [np.einsum("ntv,n...td->n...vd", oi, ei) for oi, ei in zip(onehot, e)]
    flat = [{"W": j.reshape(*j.shape[:-2], -1)} for j in (*dense_grads, *table_grads)]
    axes = _axes(n1, out, trace, diagonal)
    actual = tied.cross(xp, g[0], x[0], ids[1], e[1], axes, dense_first=True)
    _check(actual, flat[0], flat[3], out, trace, diagonal)
    actual = tied.cross(xp, g[1], x[1], ids[0], e[0], axes, dense_first=False)
    _check(actual, flat[2], flat[1], out, trace, diagonal)
