"""Weights from a model in one framework into the same architecture written in another.

Each adapter lists its model's parameterised layers in call order as :class:`TransferLayer`s,
every array converted to one canonical layout (torch's): dense weight (out, in), convolution
weight (out, in / groups, *kernel), embedding table (vocabulary, features), normalisation scale
and shift (features,), BatchNorm running ``mean`` and ``var``; self-attention as an
``attention`` layer (``q``, ``k``, ``v`` weights (out, in) and biases) followed by its output
projection, a dense layer. This module aligns two such lists and names the first pair that no
layout explains; the adapter writes the source's canonical arrays into its own layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .registry import detect_backend


def from_channels_last(kernel: np.ndarray) -> np.ndarray:
    """A convolution kernel (*kernel, in / groups, out) — Keras', flax's, haiku's — in the
    canonical layout (out, in / groups, *kernel)."""
    nd = kernel.ndim - 2
    return np.transpose(kernel, (nd + 1, nd, *range(nd)))


def to_channels_last(weight: np.ndarray) -> np.ndarray:
    """The inverse of :func:`from_channels_last`."""
    nd = weight.ndim - 2
    return np.transpose(weight, (*range(2, nd + 2), 1, 0))


class TransferError(ValueError):
    """The two models' layers do not correspond: a count, a kind or a shape differs."""


@dataclass(frozen=True)
class TransferLayer:
    """One parameterised layer, its arrays in the canonical layout (float64 numpy).

    ``name``: the framework's own name (for errors and for the adapter writing it back);
    ``detail``: what the shapes do not say but must match (a convolution's groups).
    """

    name: str
    kind: str
    arrays: Mapping[str, np.ndarray]
    detail: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        shapes = ", ".join(f"{role} {tuple(a.shape)}" for role, a in self.arrays.items())
        extra = "".join(f", {k}={v}" for k, v in self.detail.items())
        return f"{self.name!r} ({self.kind}: {shapes}{extra})"


def _mismatch(i: int, source: TransferLayer, target: TransferLayer, why: str) -> TransferError:
    return TransferError(
        f"layer {i} does not correspond: {why}\n  source {source.describe()}\n  target {target.describe()}"
    )


def align(
    source: Sequence[TransferLayer], target: Sequence[TransferLayer]
) -> list[tuple[TransferLayer, TransferLayer]]:
    """Pairs (source layer, target layer) in call order; a :class:`TransferError` naming both
    layers at the first one whose count, kind, parameter roles, detail or shapes differ."""
    for i, (s, t) in enumerate(zip(source, target)):
        if s.kind != t.kind:
            raise _mismatch(i, s, t, f"a {s.kind} layer against a {t.kind} layer")
        if set(s.arrays) != set(t.arrays):
            only_s, only_t = sorted(set(s.arrays) - set(t.arrays)), sorted(set(t.arrays) - set(s.arrays))
            parts = [
                f"only the source has {only_s}" if only_s else "",
                f"only the target has {only_t}" if only_t else "",
            ]
            raise _mismatch(i, s, t, "; ".join(p for p in parts if p))
        if dict(s.detail) != dict(t.detail):
            raise _mismatch(i, s, t, f"{dict(s.detail)} against {dict(t.detail)}")
        for role in s.arrays:
            if s.arrays[role].shape != t.arrays[role].shape:
                raise _mismatch(
                    i,
                    s,
                    t,
                    f"{role} has shape {s.arrays[role].shape} against {t.arrays[role].shape} (canonical layout)",
                )
    if len(source) != len(target):
        longer, which = (source, "source") if len(source) > len(target) else (target, "target")
        extra = "; ".join(layer.describe() for layer in longer[min(len(source), len(target)) :])
        raise TransferError(
            f"the source has {len(source)} parameterised layers and the target {len(target)}; "
            f"the {which}'s extra layers: {extra}"
        )
    return list(zip(source, target))


def transfer(
    source: Any,
    target: Any,
    *,
    source_params: Any = None,
    target_params: Any = None,
    source_backend: str | None = None,
    target_backend: str | None = None,
) -> Any:
    """Copy ``source``'s weights into ``target``, the same architecture in any framework.

    Layers are aligned in call order (torch: module order; Keras: layer order; flax and haiku:
    parameter-tree order) and converted between layouts: dense (out, in) ↔ (in, out),
    convolutions OI… ↔ …IO (grouped and depthwise, 1-3 D), embeddings, LayerNorm / RMSNorm /
    GroupNorm / BatchNorm scale and shift and BatchNorm running statistics, self-attention
    projections, ntkcore's factorized layers (two dense pieces). A JAX model is ``apply`` with its
    pytree as ``source_params`` / ``target_params`` (or an nnx or equinox module).

    Returns the target: a torch or Keras model (or nnx module) updated in place, a new params
    pytree for a JAX function, a new equinox module. Raises :class:`TransferError` naming both
    layers where the architectures differ.
    """
    from .registry import get_backend

    src = get_backend(source_backend) if source_backend else detect_backend(source, source_params, ())
    dst = get_backend(target_backend) if target_backend else detect_backend(target, target_params, ())
    for adapter in (src, dst):
        if not hasattr(adapter, "transfer_layers"):
            raise NotImplementedError(f"the {adapter.name} backend cannot transfer weights")
    pairs = align(src.transfer_layers(source, source_params), dst.transfer_layers(target, target_params))
    return dst.transfer_assign(target, target_params, {t.name: dict(s.arrays) for s, t in pairs})
