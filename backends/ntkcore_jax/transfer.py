"""A JAX model's layers for :func:`ntkcore.transfer`, in parameter-tree order (flax and haiku
keep the order layers were created in, which is their call order).

A layer is a dict of arrays, recognised by its keys: flax ``kernel``/``bias`` (dense (in, out),
convolution (*kernel, in / groups, out)), ``embedding``, ``scale``/``bias`` (a norm; a BatchNorm
when ``batch_stats`` holds ``mean``/``var`` at the same path, or an nnx BatchNorm's own), the
attention module's ``query``/``key``/``value``/``out``; haiku ``w``/``b``, ``scale``/``offset``,
``embeddings``; ntkcore's factorized dense ``u``/``v``/``b`` (two dense pieces). An nnx module
is read through its pure state dict and updated in place; a params pytree is returned anew.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ntkcore.transfer import TransferError, TransferLayer, from_channels_last, to_channels_last

_STATS = "batch_stats"


# key sets -> (kind, role -> key); a "matrix" weight is dense (in, out) when 2-D, else a
# convolution (*kernel, in / groups, out)
_FORMS: list[tuple[frozenset, str, dict[str, str]]] = [
    (frozenset({"kernel", "bias"}), "matrix", {"weight": "kernel", "bias": "bias"}),
    (frozenset({"kernel"}), "matrix", {"weight": "kernel"}),
    (frozenset({"w", "b"}), "matrix", {"weight": "w", "bias": "b"}),
    (frozenset({"w"}), "matrix", {"weight": "w"}),
    (frozenset({"embedding"}), "embedding", {"table": "embedding"}),
    (frozenset({"embeddings"}), "embedding", {"table": "embeddings"}),
    (
        frozenset({"scale", "bias", "mean", "var"}),
        "batch_norm",
        {"scale": "scale", "shift": "bias", "mean": "mean", "var": "var"},
    ),
    (frozenset({"scale", "bias"}), "norm", {"scale": "scale", "shift": "bias"}),
    (frozenset({"scale", "offset"}), "norm", {"scale": "scale", "shift": "offset"}),
    (frozenset({"scale"}), "norm", {"scale": "scale"}),
]
_ATTENTION = frozenset({"query", "key", "value", "out"})


def _is_leaf_dict(node: Mapping) -> bool:
    return all(not isinstance(v, Mapping) for v in node.values())


def _walk(node: Mapping, path: tuple, stats: Mapping | None) -> Iterator[tuple[tuple, str, dict[str, str]]]:
    """(path, kind, role -> key) of every layer under ``node``, in tree order."""
    if set(node) == _ATTENTION:
        yield path, "attention", {}
        yield (
            (*path, "out"),
            "attention_out",
            {"weight": "kernel", **({"bias": "bias"} if "bias" in node["out"] else {})},
        )
        return
    if _is_leaf_dict(node) and node:
        keys = set(node) | ({"mean", "var"} & set(stats or {}))
        if {"u", "v"} <= keys and keys <= {"u", "v", "b"}:  # ntkcore's factorized dense
            yield path, "factor_u", {"weight": "u"}
            yield path, "factor_v", {"weight": "v", **({"bias": "b"} if "b" in keys else {})}
            return
        for form, kind, roles in _FORMS:
            if keys == form:
                yield path, kind, roles
                return
        raise TransferError(f"no transfer rule for layer {'/'.join(map(str, path))!r} with parameters {sorted(node)}")
    for key, child in node.items():
        if isinstance(child, Mapping):
            yield from _walk(child, (*path, key), (stats or {}).get(key) if isinstance(stats, Mapping) else None)
        else:
            raise TransferError(f"parameter {'/'.join(map(str, (*path, key)))!r} is not inside a layer")


def _tree(model: Any, params: Any) -> tuple[dict, Any]:
    """(a plain nested dict of the parameters, how to write it back)."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        state = nnx.state(model)
        return _plain(nnx.to_pure_dict(state)), ("nnx", state)
    if params is None:
        raise TypeError("params= is required for a JAX function: the pytree of its parameters")
    if not isinstance(params, (Mapping, list, tuple)):
        raise TypeError(
            "transfer reads JAX parameters as nested dicts and lists (flax, haiku) or an nnx module, "
            f"got {type(params).__name__}"
        )
    return _plain(params), ("tree", params)


def _plain(tree: Any) -> Any:
    """Nested dicts of float arrays (RNG keys and counters dropped)."""
    if isinstance(tree, (Mapping, list, tuple)):  # a list of layers: keyed by position
        items = tree.items() if isinstance(tree, Mapping) else enumerate(tree)
        kept = {k: _plain(v) for k, v in items}
        return {k: v for k, v in kept.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree if jnp.issubdtype(jnp.asarray(tree).dtype, jnp.floating) else None


def _split(tree: dict) -> tuple[dict, dict | None]:
    """flax variables: the ``params`` collection and the ``batch_stats`` beside it."""
    if "params" in tree and isinstance(tree["params"], Mapping):
        return tree["params"], tree.get(_STATS)
    return tree, None


def _at(tree: Mapping | None, path: tuple) -> Mapping:
    for key in path:
        tree = (tree or {}).get(key, {})
    return tree or {}


def _layers(tree: dict) -> list[tuple[str, tuple, str, dict, dict]]:
    params, stats = _split(tree)
    found = []
    for path, kind, roles in _walk(params, (), stats):
        node = {**_at(params, path), **{k: v for k, v in _at(stats, path).items() if k in ("mean", "var")}}
        found.append(
            ("/".join(map(str, path)) + (f":{kind}" if kind.startswith("factor") else ""), path, kind, roles, node)
        )
    return found


def _canonical(kind: str, roles: dict, node: Mapping) -> tuple[str, dict[str, np.ndarray]]:
    """(the canonical kind, role -> array in the canonical layout) of one layer."""
    if kind == "attention":
        arrays = {}
        for role, key in (("q", "query"), ("k", "key"), ("v", "value")):
            kernel = np.asarray(node[key]["kernel"], dtype=np.float64)  # (features, heads, head size)
            arrays[role] = kernel.reshape(kernel.shape[0], -1).T
            if "bias" in node[key]:
                arrays[f"{role}_bias"] = np.asarray(node[key]["bias"], dtype=np.float64).reshape(-1)
        return "attention", arrays
    arrays = {role: np.asarray(node[key], dtype=np.float64) for role, key in roles.items()}
    if kind == "attention_out":  # (heads, head size, features)
        arrays["weight"] = arrays["weight"].reshape(-1, arrays["weight"].shape[-1]).T
        return "dense", arrays
    if kind in ("matrix", "factor_u", "factor_v"):
        weight = arrays["weight"]
        arrays["weight"] = weight.T if weight.ndim == 2 else from_channels_last(weight)
        return ("dense" if weight.ndim == 2 else "conv"), arrays
    return kind, arrays


def layers(model: Any, params: Any) -> list[TransferLayer]:
    tree, _ = _tree(model, params)
    return [TransferLayer(name, *_canonical(kind, roles, node)) for name, _, kind, roles, node in _layers(tree)]


def _set(tree: dict, path: tuple, key: str, value: Any) -> None:
    node = tree
    for step in path:
        node = node[step]
    node[key] = jnp.asarray(value, dtype=jnp.asarray(node[key]).dtype)


def assign(model: Any, params: Any, values: Mapping[str, Mapping[str, np.ndarray]]) -> Any:
    """New parameters with canonical ``values``: a pytree for a function, the nnx module updated."""
    tree, (how, original) = _tree(model, params)
    tree = _copy_dicts(tree)
    root, stats = _split(tree)
    for name, path, kind, roles, node in _layers(tree):
        new = values[name]
        if kind == "attention":
            for role, key in (("q", "query"), ("k", "key"), ("v", "value")):
                shape = np.shape(node[key]["kernel"])
                _set(root, (*path, key), "kernel", new[role].T.reshape(shape))
                if "bias" in node[key]:
                    _set(root, (*path, key), "bias", new[f"{role}_bias"].reshape(np.shape(node[key]["bias"])))
            continue
        for role, key in roles.items():
            value = new[role]
            if role == "weight":  # dense and attention output: transposed (and split into heads); conv: moved
                shape = np.shape(node[key])
                value = (
                    to_channels_last(value) if len(shape) > 2 and kind != "attention_out" else value.T.reshape(shape)
                )
            place = stats if role in ("mean", "var") else root
            _set(place, path, key, value)
    if how == "nnx":
        nnx = sys.modules["flax.nnx"]
        nnx.replace_by_pure_dict(original, _merge(nnx.to_pure_dict(original), tree))
        nnx.update(model, original)
        return model
    return _rebuild(original, tree)


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _merge(full: Any, new: Any) -> Any:
    """``full`` (with RNG state) with the arrays of ``new`` where it has them."""
    if isinstance(full, Mapping):
        return {k: _merge(v, new[k]) if isinstance(new, Mapping) and k in new else v for k, v in full.items()}
    return new


def _rebuild(original: Any, tree: dict) -> Any:
    """``tree``'s values in ``original``'s container types (FrozenDict, haiku's dicts)."""
    if isinstance(original, Mapping):
        return type(original)({k: _rebuild(v, tree[k]) if k in tree else v for k, v in original.items()})
    if isinstance(original, (list, tuple)):
        return type(original)(_rebuild(v, tree[i]) if i in tree else v for i, v in enumerate(original))
    return tree
