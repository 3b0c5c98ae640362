"""The sketched NTK: an unbiased estimate with a known error, for models too large for the exact
kernel.

Θ ≈ (J·R)(J·R)ᵀ / k with R a P×k matrix of independent Rademacher signs (E[R·Rᵀ] = k·I): each
column of J·R is one forward-mode product of the whole batch along a random tangent, so J is
never formed and the cost is k·N·[FP] (jvps), whatever P. The k tangents are split into
``blocks`` independent groups; their estimates average to the kernel, and their spread gives
its standard error (``ntkcore.sketched_ntk``). The variance falls as 1/k; Rademacher signs give
a smaller one than Gaussian entries (no fourth-moment term). The same ``seed`` gives the same R
on every call, tile and worker, so a tiled or stored sketched kernel is one sketch.

``kronecker=True`` takes the columns of R per layer from the adapter's capture: a dense layer's
weight gets s⊗r (signs over its outputs and over its inputs, still E[R·Rᵀ] = I), so its
projection is Σ_s (g_s·s)(x_s·r), tokens × (F + in) per column instead of F × in, with x_s its
inputs and g_s its output cotangents from the structured derivatives' backward passes (N·O of
them); an embedding table's is r⊗s over its rows and features; a convolution's is s⊗r over its
output channels and a patch where that costs less (``rules.conv.kronecker_pays``: few positions,
many weights), its patches formed on request where the framework differentiates it. Parameters
without such a rule are projected from their per-example gradients (or Jacobians) with plain
sign vectors. Worth it where k·P tangents would not fit, or k exceeds a few times O.

Not in :data:`~ntkcore.implementations.REGISTRY` (whose implementations are exact, and among
which ``auto`` chooses): ``implementation="sketch"`` asks for it by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..contraction import contract
from ..model_shape import group_layer
from ..protocol import Params
from ..rules import RULES
from .base import KernelCall, Method
from .structured import _formed, _group_arrays, _pieces, _shared_gradients, plan

NAME = "sketch"
# Tangent elements held at once (k·P in all): chunks of tangents stream through one jvp each.
TANGENT_ELEMENTS = 1 << 25


class Sketch(Method):
    """``sketch_dim`` random projections in ``blocks`` groups, from ``seed``."""

    name = NAME
    label = "sketch"
    title = "the sketched NTK"
    compiled = False  # it compiles its projection itself: R streams in as an argument, never a constant

    def __init__(self, sketch_dim: int, seed: int = 0, blocks: int = 8, kronecker: bool = False) -> None:
        for name, value, least in (("sketch_dim", sketch_dim, 1), ("seed", seed, 0), ("sketch_blocks", blocks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if kronecker not in (True, False):
            raise TypeError(f"sketch_kronecker must be True or False, got {kronecker!r}")
        self.sketch_dim, self.seed, self.blocks = sketch_dim, seed, min(blocks, sketch_dim)
        self.kronecker = self.uses_capture = kronecker

    def __repr__(self) -> str:
        kind = ", kronecker=True" if self.kronecker else ""
        return f"Sketch(sketch_dim={self.sketch_dim}, seed={self.seed}, blocks={self.blocks}{kind})"

    @property
    def key(self) -> tuple:
        return (self.name, type(self), self.sketch_dim, self.seed, self.blocks, self.kronecker)

    def _columns(self, start: int, stop: int, length: int) -> np.ndarray:
        """Columns ``start:stop`` of R as Rademacher signs, (stop - start, length); column i
        depends on (seed, i) alone, so any chunking, tile or worker draws the same R."""
        rows = [
            np.random.default_rng([self.seed, i]).integers(0, 2, size=length, dtype=np.int8) for i in range(start, stop)
        ]
        return (2 * np.stack(rows) - 1).astype(np.float32)  # ±1 exactly, in any float dtype

    def _tangents(self, call: KernelCall, params: Params, start: int, stop: int) -> dict[str, Any]:
        """Columns ``start:stop`` of R as tangents, name -> (stop - start, *param.shape)."""
        sizes = [math.prod(p.shape) for p in params.values()]
        signs = self._columns(start, stop, sum(sizes))
        out, offset = {}, 0
        for (name, p), size in zip(params.items(), sizes):
            piece = signs[:, offset : offset + size].reshape(stop - start, *p.shape)
            out[name] = call.backend.asarray(piece, like=p)
            offset += size
        return out

    def _signs(self, call: KernelCall, slots: list[tuple[int, ...]], start: int, stop: int, like: Any) -> list:
        """Columns ``start:stop`` of the Kronecker-structured R: per slot, one (length, c) array
        per factor, native like ``like``."""
        lengths = [n for factors in slots for n in factors]
        signs = self._columns(start, stop, sum(lengths)).T  # (Σ lengths, c)
        out, offset = [], 0
        for factors in slots:
            pieces = []
            for n in factors:
                pieces.append(call.backend.asarray(np.ascontiguousarray(signs[offset : offset + n]), like=like))
                offset += n
            out.append(pieces)
        return out

    @staticmethod
    def _projection(call: KernelCall) -> Any:
        """(params, x, tangents) -> J(x)·t for every tangent: (chunk, N, *out); compiled once per
        call setting, shared by every seed and sketch size."""
        from .. import compiled

        def make() -> Any:
            backend = call.backend

            def project(params: Params, x: Any, tangents: Params) -> Any:
                push = lambda t: backend.jvp(lambda p: call.apply(p, x), params, t)[1]  # noqa: E731
                return backend.vmap(push, (0,))(tangents)

            return backend.jit(project)

        return compiled.lookup(compiled._COMPILED, ("sketch projection", call), make)

    def _edges(self) -> list[int]:
        """Where each block of the k tangents starts (blocks differ by at most one tangent)."""
        return [round(b * self.sketch_dim / self.blocks) for b in range(self.blocks + 1)]

    def _chunks(self, size: int) -> Iterator[tuple[int, int, int]]:
        """(block, start, stop) of the tangents, chunks inside blocks, so that a chunk's tangents
        (``size`` signs per column) stay within TANGENT_ELEMENTS."""
        edges = self._edges()
        chunk = max(1, TANGENT_ELEMENTS // max(size, 1))
        for block in range(self.blocks):
            for start in range(edges[block], edges[block + 1], chunk):
                yield block, start, min(start + chunk, edges[block + 1])

    def estimates(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> list[Any]:
        """The ``blocks`` independent estimates of the kernel (each unbiased)."""
        xp = call.backend.namespace(x1)
        shape1, shape2 = call.shapes(x1, x2)
        if self.kronecker:
            side1 = _Layers(call, params, x1)
            side2 = side1 if x2 is None else _Layers(call, params, x2)
            project = lambda side, start, stop: side.project(self._signs(call, side.slots, start, stop, side.like))  # noqa: E731
            size = side1.size
        else:
            jvps = self._projection(call)
            order = lambda p: xp.permute_dims(p, (*range(1, len(p.shape)), 0))  # noqa: E731 - (N, *out, chunk)
            project = lambda x, start, stop: order(jvps(params, x, self._tangents(call, params, start, stop)))  # noqa: E731
            side1, side2, size = x1, x2, sum(math.prod(p.shape) for p in params.values())
        sums: list[Any] = [None] * self.blocks
        counts = [0] * self.blocks
        for block, start, stop in self._chunks(size):
            p1 = project(side1, start, stop)
            p2 = p1 if x2 is None else project(side2, start, stop)
            part = contract(xp, {"r": p1}, {"r": p2}, call.axes, shape1, shape2)
            sums[block] = part if sums[block] is None else sums[block] + part
            counts[block] += stop - start
        return [total / count for total, count in zip(sums, counts)]

    def kernel(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> Any:
        return sum(w * b for w, b in zip(self._weights(), self.estimates(call, params, x1, x2)))

    def with_error(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> tuple[Any, Any]:
        """(the estimate, its standard error entry by entry, from the blocks' spread).

        Block b holds m_b of the k tangents (weight w_b = m_b/k); each block's estimate has
        variance σ²/m_b, the mean σ²/k, and Σ_b w_b (Θ_b − Θ)² / (B − 1) estimates σ²/k.
        """
        if self.blocks < 2:
            raise ValueError("an error estimate needs sketch_blocks >= 2 (and sketch_dim >= 2)")
        blocks = self.estimates(call, params, x1, x2)
        weights = self._weights()
        mean = sum(w * b for w, b in zip(weights, blocks))
        spread = sum(w * (b - mean) ** 2 for w, b in zip(weights, blocks))
        return mean, call.backend.namespace(mean).sqrt(spread / (self.blocks - 1))

    def _weights(self) -> list[float]:
        """Each block's share of the k tangents."""
        edges = self._edges()
        return [(edges[b + 1] - edges[b]) / self.sketch_dim for b in range(self.blocks)]

    def per_layer(self, call: KernelCall, params: Params, x1: Any, x2: Any, layers: Any) -> dict[str, Any]:
        raise ValueError('per_layer=True takes an exact implementation, not implementation="sketch"')


class _Layers:
    """One side's structured pieces for the Kronecker-structured sketch: each captured layer's
    inputs and output cotangents, the per-example gradients of parameters shared across kinds and
    the Jacobians of those without a rule, from one set of backward passes (compiled, cached)."""

    def __init__(self, call: KernelCall, params: Params, x: Any) -> None:
        from .. import compiled

        backend, capture, xp = call.backend, call.capture, call.backend.namespace(x)
        groups, shared, fallback, _ = plan(capture, params)
        numel = {name: math.prod(p.shape) for name, p in params.items()}
        # a layer the framework differentiates keeps its per-example gradients, unless its
        # input can be formed on request and its rule's Kronecker columns cost less
        framework = [g for g in groups if g[0].kind in capture.framework_gradients]
        deferred = [g for g in framework if _by_rule(capture, g, numel)]
        direct = fallback + [n for g in framework if g not in deferred for n in g[0].params.values()]
        self.groups = [g for g in groups if g not in framework or g in deferred]
        needed = {u.key for g in self.groups for u in g} | {u.key for u in shared}
        key = ("sketch pieces", call, tuple(direct))
        pieces = compiled.lookup(
            compiled._COMPILED,
            key,
            lambda: backend.jit(lambda p, x_: _pieces(backend, capture, p, x_, call.out_shape, direct, needed)),
        )
        inputs, g, jac = _formed(capture, deferred, *pieces(params, x))
        self.xp, self.like = xp, next(iter(params.values()))
        self.arrays = [_group_arrays(xp, group, inputs, g, call.out_shape) for group in self.groups]
        self.shapes = [{role: tuple(params[n].shape) for role, n in group[0].params.items()} for group in self.groups]
        plain = dict(jac)
        if shared:
            plain.update(_shared_gradients(xp, shared, params, inputs, g, call.out_shape))
        self.plain = [xp.reshape(v, (x.shape[0], *call.out_shape, -1)) for v in plain.values()]
        self.slots = [
            factors
            for group, (a, b), shapes in zip(self.groups, self.arrays, self.shapes)
            for factors in RULES[group[0].kind].sketch_factors(shapes, a, b).values()
        ] + [(v.shape[-1],) for v in self.plain]
        self.size = sum(n for factors in self.slots for n in factors)

    def project(self, signs: list[list[Any]]) -> Any:
        """J·R for these columns: (N, *out, c)."""
        total, slot = 0, 0
        for group, (a, b), shapes in zip(self.groups, self.arrays, self.shapes):
            rule = RULES[group[0].kind]
            roles = list(rule.sketch_factors(shapes, a, b))
            total = total + rule.project(self.xp, a, b, shapes, dict(zip(roles, signs[slot : slot + len(roles)])))
            slot += len(roles)
        for v, factors in zip(self.plain, signs[slot:]):
            total = total + self.xp.matmul(v, factors[0])
        return total


def _by_rule(capture: Any, group: list, numel: dict[str, int]) -> bool:
    """Whether the Kronecker sketch takes a layer the framework differentiates by its rule."""
    layer = group_layer(capture, group, numel)
    return layer.on_request and RULES[layer.kind].sketch_pays(layer)
