"""JAX adapter: functions ``f(params, x)`` over any pytree, flax ``apply``, equinox modules."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from ntkcore.adapter import Adapter, ApplyCache
from ntkcore.protocol import PreparedModel

from .layers import factorized_dense_apply, factorized_dense_init

__all__ = ["JaxBackend", "factorized_dense_apply", "factorized_dense_init"]


def _path_name(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts) or "params"


def _is_equinox_module(model: Any) -> bool:
    return "equinox" in sys.modules and isinstance(model, sys.modules["equinox"].Module)


def _flax_module(model: Any) -> Any:
    """The flax linen module whose bound ``apply`` is ``model``, if it is one."""
    owner = getattr(model, "__self__", None)
    linen = sys.modules.get("flax.linen")
    return owner if linen is not None and isinstance(owner, linen.Module) else None


def _is_trainable_leaf(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)


def _is_nnx_module(model: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def _rule(params: Any, trainable: Callable[[str], bool] | None) -> Callable[[tuple, Any], bool]:
    """Which leaves are θ: ``trainable(name)`` when given; else, in a pytree with a top-level
    ``"params"`` collection (flax variables: ``batch_stats`` and the like beside it), the
    floating-point leaves of ``"params"`` only, whatever function receives the pytree; else every
    floating-point leaf."""
    if trainable is not None:
        return lambda path, leaf: _is_trainable_leaf(leaf) and bool(trainable(_path_name(path)))
    if isinstance(params, Mapping) and "params" in params:
        return lambda path, leaf: _path_name(path[:1]) == "params" and _is_trainable_leaf(leaf)
    return lambda path, leaf: _is_trainable_leaf(leaf)


_PER_BATCH = ApplyCache()  # one batched call per module object, so that compiled kernels are reused


def _haiku(model: Callable, state: Any) -> Callable:
    """A haiku ``apply`` as ``f(params, x)``: ``hk.transform``'s takes an rng (``None``: the
    model must be deterministic), ``hk.transform_with_state``'s the ``state`` too and returns
    ``(out, new_state)``. Other functions as they are (``state=`` is refused)."""
    kind = getattr(model, "__qualname__", "") if getattr(model, "__module__", "").startswith("haiku") else ""
    if kind.startswith("transform_with_state.") and kind.endswith("apply_fn"):
        if state is None:
            raise TypeError("model is a haiku transform_with_state apply: pass its state with state=")
        wrapped = lambda params, x: model(params, state, None, x)[0]  # noqa: E731 - the state a constant
        return _PER_BATCH.shared(("haiku", id(model), id(state)), wrapped, model, state)
    if state is not None:
        raise TypeError("state= is for a haiku transform_with_state apply function; this model takes no state")
    if kind.startswith("without_state.") and kind.endswith("apply_fn"):
        return _PER_BATCH.shared(("haiku", id(model)), lambda params, x: model(params, None, x), model)
    return model


def _prepare_equinox(model: Any, trainable: Callable[[str], bool] | None) -> PreparedModel:
    eqx = sys.modules["equinox"]
    dynamic, static = eqx.partition(model, eqx.is_inexact_array)

    def per_batch(tree: Any, x: Any) -> Any:
        return jax.vmap(eqx.combine(tree, static))(x)

    per_batch = _PER_BATCH.shared(("equinox", id(model)), per_batch, model)
    apply, flat = _functional(per_batch, dynamic, _rule(None, trainable))
    return PreparedModel(apply, flat, accepts_integer_inputs=_accepts_integer_inputs(apply, flat), source=model)


def _prepare_nnx(model: Any, trainable: Callable[[str], bool] | None) -> PreparedModel:
    """θ: the ``nnx.Param`` variables (or what ``trainable`` names); BatchNorm statistics, RNG
    state and other variables are constants."""
    nnx = sys.modules["flax.nnx"]
    if trainable is None:
        graph, state, rest = nnx.split(model, nnx.Param, ...)
    else:
        (graph, state), rest = nnx.split(model), None

    def per_batch(tree: Any, x: Any) -> Any:
        return nnx.merge(graph, tree, *(() if rest is None else (rest,)))(x)

    per_batch = _PER_BATCH.shared(("nnx", id(model), trainable), per_batch, model)
    apply, flat = _functional(per_batch, state, _rule(None, trainable), strip=".value")
    return PreparedModel(apply, flat, accepts_integer_inputs=_accepts_integer_inputs(apply, flat), source=model)


_IMMUTABLE = (jax.Array, bool, int, float, complex, str, type(None))
_APPLY_CACHE = ApplyCache()  # so that repeated calls reuse compiled kernels


def _functional(
    model: Any, tree: Any, trainable: Callable[[tuple, Any], bool], strip: str = ""
) -> tuple[Callable, dict]:
    """Split ``tree`` into an ordered trainable map and constants; ``apply`` rebuilds it.

    The same model with the same structure and the same (immutable) constants gets the same
    ``apply`` back, so the core's cache of compiled kernels hits across ``ntk()`` calls.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    slots = [i for i, (path, leaf) in enumerate(flat) if trainable(path, leaf)]
    _warn_integer_leaves(flat)
    names = [_path_name(flat[i][0]).removesuffix(strip) for i in slots]
    params = {name: jnp.asarray(flat[i][1]) for name, i in zip(names, slots)}
    constants = [None if i in slots else leaf for i, (_, leaf) in enumerate(flat)]
    owners = (getattr(model, "__self__", model), getattr(model, "__func__", model))
    key = (*map(id, owners), treedef, tuple(slots), tuple(names), tuple(map(id, constants)))

    def apply(p: Mapping[str, Any], x: Any, **model_kwargs: Any) -> Any:
        leaves = list(constants)
        for name, i in zip(names, slots):
            leaves[i] = p[name]
        return model(jax.tree_util.tree_unflatten(treedef, leaves), x, **model_kwargs)

    if all(isinstance(c, _IMMUTABLE) for c in constants):
        apply = _APPLY_CACHE.shared(key, apply, owners, constants)
    return apply, params


def _warn_integer_leaves(flat: list) -> None:
    """Integer and boolean array leaves have no derivative: they are constants, which users may
    not expect of a leaf of their params pytree."""
    found = [
        _path_name(path)
        for path, leaf in flat
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape") and not jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if found:
        warnings.warn(
            f"params: the leaves {found} are integer or boolean arrays; they are held constant (a kernel is "
            "taken with respect to floating-point parameters only). Cast them to a float dtype to include them",
            stacklevel=5,
        )


_MASKS = {"eq", "ne", "lt", "le", "gt", "ge"}  # comparisons of ids (one-hot) are not arithmetic
_INDEXING = {"gather", "dynamic_slice", "dynamic_update_slice", "scatter", "scatter-add", "scatter_add"}


def _uses_as_numbers(jaxpr: Any, tainted: set) -> bool:
    """Whether integer values derived from ``tainted`` inputs enter floating-point arithmetic."""
    for eqn in jaxpr.eqns:
        hits = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jex_core.Literal) and v in tainted]
        if not hits or eqn.primitive.name in _MASKS or eqn.primitive.name in _INDEXING:
            continue
        subs = [getattr(p, "jaxpr", p) for p in eqn.params.values()]
        subs = [sub for sub in subs if isinstance(sub, jex_core.Jaxpr)]
        for sub in subs:
            if len(sub.invars) == len(eqn.invars):
                inner = {sub.invars[i] for i in hits}
            else:
                inner = {v for v in sub.invars if not jnp.issubdtype(v.aval.dtype, jnp.inexact)}
            if _uses_as_numbers(sub, inner):
                return True
        if not subs and any(jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in eqn.outvars):
            return True
        tainted.update(v for v in eqn.outvars if not jnp.issubdtype(v.aval.dtype, jnp.inexact))
    return False


def _accepts_integer_inputs(apply: Callable, params: dict) -> Callable[[Any], bool]:
    """Integers are ids (gathered, compared) unless the model does arithmetic with them."""

    def check(x: Any) -> bool:
        jaxpr = jax.make_jaxpr(apply)(params, x[:1]).jaxpr
        return not _uses_as_numbers(jaxpr, {jaxpr.invars[-1]})

    return check


class JaxBackend(Adapter):
    """Autodiff interface on JAX transforms."""

    name = "jax"
    native = (jax.Array,)
    arrays_text, model_text = "a JAX or numpy array", "JAX"

    def owns(self, model: Any, params: Any, arrays: tuple[Any, ...]) -> bool:
        if _is_equinox_module(model) or _is_nnx_module(model) or _flax_module(model) is not None:
            return True
        leaves = jax.tree_util.tree_leaves(params) + list(arrays)
        return any(isinstance(leaf, jax.Array) for leaf in leaves)

    def prepare(
        self, model: Any, params: Any, trainable: Callable[[str], bool] | None = None, state: Any = None
    ) -> PreparedModel:
        """``trainable``: a predicate on parameter names (``"params.Dense_0.kernel"``) choosing the
        floating-point leaves to differentiate, in place of the default rules. ``state``: a haiku
        ``transform_with_state`` model's state."""
        if _is_nnx_module(model) or _is_equinox_module(model):
            if params is not None:
                raise TypeError(
                    f"params= is not used for a {type(model).__name__} module: pass the module itself as model"
                )
            return (_prepare_nnx if _is_nnx_module(model) else _prepare_equinox)(model, trainable)
        if not callable(model):
            raise TypeError(f"model must be a function f(params, x) for the JAX backend, got {type(model).__name__}")
        if params is None:
            raise TypeError("params= is required for a JAX function model f(params, x): pass its parameter pytree")
        model = _haiku(model, state)
        apply, flat = _functional(model, params, _rule(params, trainable))
        return PreparedModel(apply, flat, accepts_integer_inputs=_accepts_integer_inputs(apply, flat), source=model)

    def namespace(self, *arrays: Any) -> Any:
        return array_api_compat.array_namespace(*arrays) if arrays else jnp

    def from_numpy(self, x: np.ndarray, like: Any, *, cast: bool) -> Any:
        return jnp.asarray(x, dtype=like.dtype if cast else None)

    def cast(self, x: Any, like: Any) -> Any:
        return x.astype(like.dtype)

    def is_floating(self, x: Any) -> bool:
        return bool(jnp.issubdtype(x.dtype, jnp.floating))

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype)

    def jvp(self, fn: Callable, primals: Mapping[str, Any], tangents: Mapping[str, Any]) -> tuple[Any, Any]:
        return jax.jvp(fn, (dict(primals),), (dict(tangents),))

    def vjp(self, fn: Callable, primals: Mapping[str, Any]) -> tuple[Any, Callable]:
        out, pullback = jax.vjp(fn, dict(primals))
        return out, lambda cotangent: pullback(cotangent)[0]

    def vmap(self, fn: Callable, in_axes: tuple[int | None, ...], chunk_size: int | None = None) -> Callable:
        if chunk_size is None:
            return jax.vmap(fn, in_axes=in_axes)
        mapped = [i for i, axis in enumerate(in_axes) if axis is not None]
        if any(in_axes[i] != 0 for i in mapped):
            raise NotImplementedError(f"chunked vmap maps over axis 0 only, got in_axes={in_axes}")

        def chunked(*args: Any) -> Any:
            def one(elems: tuple) -> Any:
                full = list(args)
                for i, e in zip(mapped, elems):
                    full[i] = e
                return fn(*full)

            return jax.lax.map(one, tuple(args[i] for i in mapped), batch_size=chunk_size)

        return chunked

    def jit(self, fn: Callable) -> Callable:
        return jax.jit(fn)

    def memory_available(self, like: Any) -> int | None:
        devices = getattr(like, "devices", lambda: set())()
        device = next(iter(devices), None)
        if device is None or device.platform == "cpu":
            return None
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
