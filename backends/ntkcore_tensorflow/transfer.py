"""A Keras model's layers for :func:`ntkcore.transfer`, in layer order, converted to the canonical
(torch) layouts: Dense (in, out) → (out, in); Conv (*kernel, in / groups, out) → (out, in /
groups, *kernel); DepthwiseConv (*kernel, in, multiplier) → (in·multiplier, 1, *kernel);
MultiHeadAttention's (features, heads, head size) projections → (heads·head size, features)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import numpy as np

from ntkcore.transfer import TransferError, TransferLayer, from_channels_last, to_channels_last

_L = keras.layers


def _dense_to(kernel: np.ndarray) -> np.ndarray:
    return kernel.T


def _depthwise_to(kernel: np.ndarray) -> np.ndarray:
    nd = kernel.ndim - 2  # (*k, in, multiplier) -> (in, multiplier, *k) -> (in·multiplier, 1, *k)
    moved = np.transpose(kernel, (nd, nd + 1, *range(nd)))
    return moved.reshape(-1, 1, *moved.shape[2:])


def _depthwise_from(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    nd = len(shape) - 2

    def convert(weight: np.ndarray) -> np.ndarray:
        moved = weight.reshape(shape[nd], shape[nd + 1], *weight.shape[2:])
        return np.transpose(moved, (*range(2, nd + 2), 0, 1))

    return convert


_IDENTITY = (lambda a: a, lambda a: a)
_DENSE = (_dense_to, _dense_to)
_CONV = (from_channels_last, to_channels_last)


def _table(layer: Any) -> tuple[str, dict[str, tuple[str, tuple]]] | None:
    """(kind, role -> (attribute, (to canonical, from canonical))) of a layer transfer knows."""
    if type(layer) is _L.Dense:
        return "dense", {"weight": ("kernel", _DENSE), "bias": ("bias", _IDENTITY)}
    if isinstance(layer, (_L.DepthwiseConv1D, _L.DepthwiseConv2D)):
        shape = tuple(layer.kernel.shape)
        return "conv", {
            "weight": ("kernel", (_depthwise_to, _depthwise_from(shape))),
            "bias": ("bias", _IDENTITY),
        }
    if isinstance(layer, (_L.Conv1D, _L.Conv2D, _L.Conv3D)) and not isinstance(layer, _L.Conv2DTranspose):
        return "conv", {"weight": ("kernel", _CONV), "bias": ("bias", _IDENTITY)}
    if isinstance(layer, _L.Embedding):
        return "embedding", {"table": ("embeddings", _IDENTITY)}
    if isinstance(layer, _L.BatchNormalization):
        stats = {"mean": ("moving_mean", _IDENTITY), "var": ("moving_variance", _IDENTITY)}
        return "batch_norm", {"scale": ("gamma", _IDENTITY), "shift": ("beta", _IDENTITY), **stats}
    if isinstance(layer, (_L.LayerNormalization, _L.GroupNormalization)):
        return "norm", {"scale": ("gamma", _IDENTITY), "shift": ("beta", _IDENTITY)}
    if isinstance(layer, _L.RMSNormalization):
        return "norm", {"scale": ("scale", _IDENTITY)}
    return None


def _walk(layer: Any) -> Iterator[tuple[Any, str, dict]]:
    """(layer, kind, role -> (attribute, converters)) in layer order, into nested models and layers."""
    if isinstance(layer, _L.MultiHeadAttention):
        yield layer, "attention", {}
        yield layer._output_dense, "attention_output", {}
        return
    found = _table(layer)
    if found is not None:
        kind, roles = found
        roles = {r: v for r, v in roles.items() if getattr(layer, v[0], None) is not None}
        if roles:  # a norm without scale and shift has nothing to transfer, as in torch
            yield layer, kind, roles
        return
    children = [c for c in layer._flatten_layers(include_self=False, recursive=False)]
    if children:
        for child in children:
            yield from _walk(child)
        return
    if layer.weights:
        raise TransferError(
            f"no transfer rule for layer {layer.name!r} ({type(layer).__name__}); transfer knows dense, "
            "convolution, embedding, normalisation and attention layers"
        )


def _attention(layer: Any) -> dict[str, np.ndarray]:
    arrays = {}
    for role, dense in (("q", layer._query_dense), ("k", layer._key_dense), ("v", layer._value_dense)):
        kernel = np.asarray(dense.kernel, dtype=np.float64)  # (features, heads, head size)
        arrays[role] = kernel.reshape(kernel.shape[0], -1).T
        if dense.bias is not None:
            arrays[f"{role}_bias"] = np.asarray(dense.bias, dtype=np.float64).reshape(-1)
    return arrays


def _output(layer: Any) -> dict[str, np.ndarray]:
    kernel = np.asarray(layer.kernel, dtype=np.float64)  # (heads, head size, features)
    arrays = {"weight": kernel.reshape(-1, kernel.shape[-1]).T}
    if layer.bias is not None:
        arrays["bias"] = np.asarray(layer.bias, dtype=np.float64).reshape(-1)
    return arrays


def _named(model: Any) -> list[tuple[str, Any, str, dict]]:
    """Layers with unique names (a path where nested layers repeat a name)."""
    return [(f"{i}:{layer.name}", layer, kind, roles) for i, (layer, kind, roles) in enumerate(_walk(model))]


def layers(model: Any, params: Any) -> list[TransferLayer]:
    if params is not None:
        raise TypeError("params= is not used for a Keras model: it holds its own weights")
    found = []
    for name, layer, kind, roles in _named(model):
        if kind == "attention":
            found.append(TransferLayer(name, kind, _attention(layer)))
        elif kind == "attention_output":
            found.append(TransferLayer(name, "dense", _output(layer)))
        else:
            arrays = {r: to(np.asarray(getattr(layer, attr), dtype=np.float64)) for r, (attr, (to, _)) in roles.items()}
            found.append(TransferLayer(name, kind, arrays))
    return found


def assign(model: Any, params: Any, values: Mapping[str, Mapping[str, np.ndarray]]) -> Any:
    """Write canonical ``values`` (layer name -> role -> array) into ``model``, in place."""
    for name, layer, kind, roles in _named(model):
        new = values[name]
        if kind == "attention":
            for role, dense in (("q", layer._query_dense), ("k", layer._key_dense), ("v", layer._value_dense)):
                dense.kernel.assign(new[role].T.reshape(dense.kernel.shape))
                if dense.bias is not None:
                    dense.bias.assign(new[f"{role}_bias"].reshape(dense.bias.shape))
        elif kind == "attention_output":
            layer.kernel.assign(new["weight"].T.reshape(layer.kernel.shape))
            if layer.bias is not None:
                layer.bias.assign(new["bias"].reshape(layer.bias.shape))
        else:
            for role, (attr, (_, back)) in roles.items():
                variable = getattr(layer, attr)
                variable.assign(np.asarray(back(new[role]), dtype=variable.dtype))
    return model
