"""``ntkcore.factorize`` for JAX: a 2-D weight leaf becomes factors ``{"u": U, "v": V}``.

The user's ``apply`` is not rewritten by hand: the factorized ``apply`` evaluates the jaxpr of
the original one equation by equation, with each factorized weight carried as its pair of
factors, and every ``dot_general`` that contracts one of its axes becomes two chained
products, (x·U)·V. Any other use of the weight gets the product U·V, exact but unstructured.
Weights are taken as stored, (in, out) in flax and haiku: U (in, rank), V (rank, out).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

_CALLS = {"pjit", "jit", "closed_call", "core_call"}


@dataclass(frozen=True)
class _LowRank:
    """A factorized 2-D weight flowing through the jaxpr: its value is u @ v."""

    u: Any
    v: Any

    def dense(self) -> Any:
        return self.u @ self.v


def _dot(eqn: Any, invals: list, index: int) -> Any:
    """``dot_general`` with factorized operand ``index``, as two products through the rank."""
    w: _LowRank = invals[index]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contracted = (lc, rc)[index]
    if lb or rb or len(contracted) != 1:
        return None
    # the factor with W's contracted axis in place (the free axis now of size rank), and the
    # (rank, free) map from the rank to W's free axis
    first, second = (w.u, w.v) if contracted[0] == 0 else (w.v, w.u.T)
    args = list(invals)
    args[index] = first
    h = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))  # the same product, now to rank
    options = {k: eqn.params[k] for k in ("precision", "preferred_element_type") if k in eqn.params}
    if index == 1:  # the rank axis is h's last
        return jax.lax.dot_general(h, second, (((h.ndim - 1,), (0,)), ((), ())), **options)
    return jax.lax.dot_general(second, h, (((0,), (0,)), ((), ())), **options)  # the rank axis is h's first


def _low_rank_eqn(eqn: Any, invals: list) -> list | None:
    hits = [i for i, v in enumerate(invals) if isinstance(v, _LowRank)]
    name = eqn.primitive.name
    if name in _CALLS and isinstance(eqn.params.get("jaxpr"), jex_core.ClosedJaxpr):
        closed = eqn.params["jaxpr"]
        return _evaluate(closed.jaxpr, closed.consts, invals)
    if len(hits) != 1:
        return None
    w = invals[hits[0]]
    if name == "dot_general":
        out = _dot(eqn, invals, hits[0])
        return None if out is None else [out]
    if name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0):
        return [_LowRank(w.v.T, w.u.T)]
    if name == "convert_element_type":
        dtype = eqn.params["new_dtype"]
        return [_LowRank(w.u.astype(dtype), w.v.astype(dtype))]
    if name in ("copy", "copy_p"):
        return [w]
    return None


def _evaluate(jaxpr: Any, consts: list, args: list) -> list:
    env: dict = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outvals = _low_rank_eqn(eqn, invals) if any(isinstance(v, _LowRank) for v in invals) else None
        if outvals is None:
            invals = [v.dense() if isinstance(v, _LowRank) else v for v in invals]
            outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outvals = outvals if eqn.primitive.multiple_results else [outvals]
        env.update(zip(eqn.outvars, outvals))
    return [v.dense() if isinstance(v, _LowRank) else v for v in map(read, jaxpr.outvars)]


def _leaves(params: Any) -> list[tuple[str, Any]]:
    from . import _path_name

    return [(_path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def dense_layers(model: Any, params: Any) -> dict[str, tuple[np.ndarray, bool]]:
    from . import _is_equinox_module

    if _is_equinox_module(model) or not callable(model):
        raise TypeError(
            "model: to factorize a JAX model pass its function apply(params, x) and params= (for an "
            f"equinox module, eqx.partition it into arrays and the rest first), got {type(model).__name__}"
        )
    if params is None:
        raise ValueError("params= is required to factorize a JAX model: the pytree apply(params, x) takes")
    return {
        name: (np.asarray(leaf, dtype=np.float64), not _flax(model, params) or name.startswith("params."))
        for name, leaf in _leaves(params)
        if getattr(leaf, "ndim", 0) == 2 and jnp.issubdtype(leaf.dtype, jnp.inexact)
    }


def _flax(model: Any, params: Any) -> bool:
    """flax variables, where only the "params" collection is trained (the adapter's rule)."""
    return isinstance(params, Mapping) and "params" in params


def factorized(model: Callable, params: Any, factors: Mapping[str, Any]) -> tuple[Callable, Any]:
    """``(apply, params)``: the params pytree with each factorized weight replaced by
    ``{"u": U, "v": V}`` (``{"u": U}`` with V a constant when V is not trained)."""
    names = [name for name, _ in _leaves(params)]
    treedef = jax.tree_util.tree_structure(params)
    fixed_v: dict[int, Any] = {}

    def replace(slot: int, leaf: Any) -> Any:
        f = factors.get(names[slot])
        if f is None:
            return leaf
        put = lambda a: jax.device_put(jnp.asarray(a, dtype=leaf.dtype), next(iter(leaf.devices())))  # noqa: E731
        if not f.train_v:
            fixed_v[slot] = put(f.v)
            return {"u": put(f.u)}
        return {"u": put(f.u), "v": put(f.v)}

    leaves = jax.tree_util.tree_leaves(params)
    new_params = jax.tree_util.tree_unflatten(treedef, [replace(i, leaf) for i, leaf in enumerate(leaves)])
    shapes = jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves])
    jaxprs: dict = {}

    def apply(p: Any, x: Any) -> Any:
        slots = treedef.flatten_up_to(p)
        args = []
        for i, value in enumerate(slots):
            if isinstance(value, Mapping) and "u" in value and names[i] in factors:
                value = _LowRank(value["u"], value["v"] if i not in fixed_v else fixed_v[i])
            args.append(value)
        spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)
        key = str(spec)
        if key not in jaxprs:
            jaxprs[key] = jax.make_jaxpr(model, return_shape=True)(shapes, spec)
        closed, out_shape = jaxprs[key]
        out = _evaluate(closed.jaxpr, closed.consts, [*args, *jax.tree_util.tree_leaves(x)])
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return apply, new_params
