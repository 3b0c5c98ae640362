"""Per-layer capture for structured derivatives, from the jaxpr of ``apply(params, x)``.

Equations that consume a parameter (through reshape, transpose or dtype conversion) are
matched to the core's kinds: ``dot_general`` → dense; ``add``/``sub`` with a broadcast
parameter → dense with a constant ±1 input (a bias); ``mul`` → affine scale (by the other
factor, broadcast: flax's norms multiply γ into rsqrt(var) first); a row
``gather`` → embedding. Any other use of a parameter (a convolution, a parameter feeding
another parameter, a custom derivative rule) sends that parameter to the exact fallback,
so an unmatched pattern never gives a wrong number. Calls to jitted sub-functions are
inlined; a ``scan`` that reads parameters as constants (an RNN cell) is walked into, and
evaluated step by step, each step's matches a call of their layer. The model is then
re-evaluated equation by equation with a zero probe added to each
matched output, in canonical (1, tokens, features) layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp

from ntkcore.protocol import LAYER_OUTPUT, Capture, LayerUse, PreparedModel

_VIEWS = {"reshape", "transpose", "convert_element_type", "copy", "copy_p"}
_CALLS = {"pjit", "jit", "closed_call", "core_call"}
# scans stepped through during the capture: each step is traced, so longer ones fall back (exact)
SCAN_STEPS = 256


@dataclass(frozen=True)
class _Origin:
    """A value that is a view of parameter ``name``: the parameter itself (``exact``), a
    bijective reshuffle, or a broadcast (``feature_dims``: output dims holding its entries)."""

    name: str
    exact: bool = True  # False once reshaped or transposed: entries no longer in their own layout
    feature_dims: tuple[int, ...] | None = None  # set for broadcasts
    axes: tuple[int, ...] | None = None  # the parameter's axis behind each axis; None once reshaped


@dataclass(frozen=True)
class _Match:
    use: LayerUse
    exact: bool  # the parameter in its own layout: several such uses of it are one layer's calls
    structured_input: Callable[[list], Any]
    add_probe: Callable[[Any, Any], Any]
    probe_shape: tuple[int, ...]
    canonical: Callable[[Any], Any]  # the output in the probe's (1, tokens, features) layout


def _canonical(y_shape: tuple[int, ...], tokens: list[int], features: list[int]) -> tuple[list[int], tuple]:
    perm = tokens + features
    s = math.prod(y_shape[d] for d in tokens)
    f = math.prod(y_shape[d] for d in features)
    return perm, (1, s, f)


def _probe_adder(y_shape: tuple[int, ...], perm: list[int]) -> Callable[[Any, Any], Any]:
    inverse = [perm.index(d) for d in range(len(perm))]
    permuted = [y_shape[d] for d in perm]

    def add(y: Any, probe: Any) -> Any:
        return y + jnp.transpose(jnp.reshape(probe, permuted), inverse)

    return add


def _feature_dims(origin: _Origin, operand_shape: tuple, out_shape: tuple) -> list[int] | None:
    """Output dims that hold distinct parameter entries; the others are token dims."""
    if len(operand_shape) != len(out_shape):
        return None
    mapped = range(len(out_shape)) if origin.feature_dims is None else origin.feature_dims
    return [d for d in mapped if operand_shape[d] == out_shape[d]]


class _Walker:
    def __init__(self) -> None:
        self.matches: dict[tuple, _Match] = {}
        self.inline: set[tuple] = set()
        self.scans: dict[tuple, int] = {}  # scans run step by step: path -> length
        self.excluded: dict[str, str] = {}
        self.count = 0

    def reject(self, origins: list[_Origin], primitive: str) -> None:
        for origin in origins:
            self.excluded.setdefault(origin.name, f"is used by {primitive}, which has no structured rule")

    def walk(self, jaxpr: Any, origins: dict, path: tuple = ()) -> list:
        for i, eqn in enumerate(jaxpr.eqns):
            here = (*path, i)
            found = [
                (k, origins[v])
                for k, v in enumerate(eqn.invars)
                if not isinstance(v, jex_core.Literal) and v in origins
            ]
            if not found:
                continue
            name = eqn.primitive.name
            if name in _CALLS and isinstance(eqn.params.get("jaxpr"), jex_core.ClosedJaxpr):
                sub = eqn.params["jaxpr"].jaxpr
                inner = {sub.invars[k]: o for k, o in found}
                self.inline.add(here)
                for var, origin in zip(eqn.outvars, self.walk(sub, inner, here)):
                    if origin is not None:
                        origins[var] = origin
                continue
            if name == "scan" and all(k < eqn.params["num_consts"] for k, _ in found):
                if eqn.params["length"] <= SCAN_STEPS:
                    self._scan(eqn, found, here)
                    continue
                for _, origin in found:
                    self.excluded.setdefault(
                        origin.name,
                        f"is read by a scan of {eqn.params['length']} steps (stepped through up to {SCAN_STEPS})",
                    )
                continue
            if name in _VIEWS and len(found) == 1:
                origin = found[0][1]
                if origin.feature_dims is None:
                    axes = origin.axes
                    if name == "transpose" and axes is not None:
                        axes = tuple(axes[d] for d in eqn.params["permutation"])
                    elif name == "reshape":
                        axes = None
                    exact = origin.exact and name not in ("reshape", "transpose")
                    origins[eqn.outvars[0]] = _Origin(origin.name, exact, None, axes)
                    continue
            if name == "broadcast_in_dim" and len(found) == 1:
                origin = found[0][1]
                dims = tuple(eqn.params["broadcast_dimensions"])
                if origin.feature_dims is not None:  # a broadcast of a broadcast (nested vmaps)
                    dims = tuple(dims[d] for d in origin.feature_dims)
                origins[eqn.outvars[0]] = _Origin(origin.name, origin.exact, dims, origin.axes)
                continue
            match = self.match(eqn, found)
            if match is None:
                self.reject([o for _, o in found], name)
            else:
                self.matches[here] = match
        return [origins.get(v) for v in jaxpr.outvars]

    def _scan(self, eqn: Any, found: list, here: tuple) -> None:
        """A scan whose body reads parameters as constants (an RNN cell): its matches are calls
        at every step, each with its own probe, as the scan is evaluated step by step."""
        body = eqn.params["jaxpr"].jaxpr
        leaked = self.walk(body, {body.invars[k]: o for k, o in found}, here)
        for origin in leaked:  # a parameter carried or emitted as it is: no structure for that
            if origin is not None:
                self.excluded.setdefault(origin.name, "is passed through a scan, which has no structured rule")
        self.scans[here] = eqn.params["length"]

    def steps(self, path: tuple) -> list[str]:
        """The key suffixes of the calls of a match at ``path``: one per step of each enclosing scan."""
        suffixes = [""]
        for scan, length in sorted(self.scans.items(), key=lambda item: len(item[0])):
            if path[: len(scan)] == scan and len(path) > len(scan):
                suffixes = [f"{s}@{t}" for s in suffixes for t in range(length)]
        return suffixes

    def _use(
        self,
        kind: str,
        role: str,
        origin: _Origin,
        out_shape: tuple,
        tokens: list[int],
        make_input: Callable,
        native: bool = False,
        groups: int = 1,
    ) -> _Match:
        """A matched call: probes and inputs in canonical (1, tokens, features) layout.

        ``make_input(invals, perm, probe)`` builds the structured input from the equation's
        operands, given the output permutation and the probe shape.
        """
        features = [d for d in range(len(out_shape)) if d not in tokens]
        perm, probe = _canonical(out_shape, tokens, features)
        key = f"{kind}#{self.count}"
        self.count += 1
        return _Match(
            LayerUse(key, origin.name, kind, {role: origin.name}, native_layout=native, groups=groups),
            origin.exact,
            lambda invals: make_input(invals, perm, probe),
            _probe_adder(out_shape, perm),
            probe,
            lambda y: jnp.reshape(jnp.transpose(y, perm), probe),
        )

    def match(self, eqn: Any, found: list) -> _Match | None:
        """The rule's view of an equation that consumes one parameter, or ``None``."""
        matcher = _MATCHERS.get(eqn.primitive.name)
        if len(found) != 1 or matcher is None:
            return None
        index, origin = found[0]
        return matcher(self, eqn, index, origin)

    def _dot_general(self, eqn: Any, index: int, origin: _Origin) -> _Match | None:
        out_shape, shapes = _shapes(eqn)
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb or origin.feature_dims is not None:
            return None
        xi = 1 - index
        cx = list((lc, rc)[xi])
        fx = [d for d in range(len(shapes[xi])) if d not in cx]
        n_w_free = len(shapes[index]) - len(cx)
        tokens = list(range(len(fx))) if xi == 0 else list(range(n_w_free, len(out_shape)))
        n_in = math.prod(shapes[xi][d] for d in cx)

        def dense_input(invals: list, perm: list, probe: tuple) -> Any:
            return jnp.reshape(jnp.transpose(invals[xi], fx + cx), (1, -1, n_in))

        # native: the weight's gradient (free axes, then contracted) is the parameter's layout
        order = [d for d in range(len(shapes[index])) if d not in (lc, rc)[index]] + list((lc, rc)[index])
        native = origin.axes is not None and [origin.axes[d] for d in order] == sorted(origin.axes)
        return self._use("dense", "weight", origin, out_shape, tokens, dense_input, native)

    def _conv(self, eqn: Any, index: int, origin: _Origin) -> _Match | None:
        out_shape, shapes = _shapes(eqn)
        prm = eqn.params
        if index != 1 or origin.feature_dims is not None:
            return None
        if prm["batch_group_count"] != 1 or any(d != 1 for d in prm["lhs_dilation"]):
            return None
        dn = prm["dimension_numbers"]
        filter_shape = tuple(shapes[1][d] for d in dn.rhs_spec[2:])

        def patch_input(invals: list, perm: list, probe: tuple) -> Any:
            patches = jax.lax.conv_general_dilated_patches(
                invals[0], filter_shape, prm["window_strides"], prm["padding"],
                rhs_dilation=prm["rhs_dilation"], dimension_numbers=dn,
            )  # fmt: skip
            return jnp.reshape(jnp.transpose(patches, perm), (1, probe[1], prm["feature_group_count"], -1))

        tokens = [dn.out_spec[0], *dn.out_spec[2:]]
        return self._use("conv", "weight", origin, out_shape, tokens, patch_input, groups=prm["feature_group_count"])

    def _elementwise(self, eqn: Any, index: int, origin: _Origin) -> _Match | None:
        """``mul`` by a broadcast parameter is an affine scale; ``add``/``sub`` a bias."""
        out_shape, shapes = _shapes(eqn)
        name, other = eqn.primitive.name, 1 - index
        features = _feature_dims(origin, shapes[index], out_shape)
        if not _broadcasts_to(shapes[other], out_shape) or features is None:
            return None
        tokens = [d for d in range(len(out_shape)) if d not in features]
        if name == "mul":  # the other factor may be broadcast too (flax's LayerNorm: rsqrt(var)·γ)

            def scale_input(invals: list, perm: list, probe: tuple) -> Any:
                full = jnp.broadcast_to(invals[other], out_shape)
                return jnp.reshape(jnp.transpose(full, perm), probe)

            return self._use("affine", "scale", origin, out_shape, tokens, scale_input, origin.axes == (0,))
        sign = -1.0 if (name == "sub" and index == 1) else 1.0  # ∂(a - b)/∂b = -1
        dtype = eqn.outvars[0].aval.dtype

        def bias_input(invals: list, perm: list, probe: tuple) -> Any:  # a dense layer on a constant ±1
            return jnp.full((1, probe[1], 1), sign, dtype=dtype)

        return self._use("dense", "weight", origin, out_shape, tokens, bias_input, origin.axes == (0,))

    def _gather(self, eqn: Any, index: int, origin: _Origin) -> _Match | None:
        out_shape, shapes = _shapes(eqn)
        if index != 0 or not origin.exact or origin.feature_dims is not None:
            return None
        dn = eqn.params["dimension_numbers"]
        simple = (
            len(shapes[0]) == 2
            and tuple(dn.collapsed_slice_dims) == (0,)
            and tuple(dn.start_index_map) == (0,)
            and tuple(dn.offset_dims) == (len(out_shape) - 1,)
            and not getattr(dn, "operand_batching_dims", ())
            and tuple(eqn.params["slice_sizes"]) == (1, shapes[0][1])
            and shapes[1][-1] == 1
        )
        if not simple:
            return None

        def ids_input(invals: list, perm: list, probe: tuple) -> Any:
            return jnp.reshape(invals[1][..., 0], (1, -1))

        tokens = list(range(len(out_shape) - 1))
        return self._use("embedding", "table", origin, out_shape, tokens, ids_input, native=True)


def _broadcasts_to(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether an operand of ``shape`` broadcasts to ``out_shape`` (size-1 axes, a scalar)."""
    aligned = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    return len(shape) <= len(out_shape) and all(s in (1, o) for s, o in zip(aligned, out_shape))


def _shapes(eqn: Any) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The equation's output shape and its operands' shapes."""
    return tuple(eqn.outvars[0].aval.shape), [tuple(v.aval.shape) for v in eqn.invars]


# primitive -> the walker's matcher: the adapter's layer table
_MATCHERS: dict[str, Callable[[_Walker, Any, int, _Origin], _Match | None]] = {
    "dot_general": _Walker._dot_general,
    "conv_general_dilated": _Walker._conv,
    "add": _Walker._elementwise,
    "sub": _Walker._elementwise,
    "mul": _Walker._elementwise,
    "gather": _Walker._gather,
}


def _evaluate_scan(walker: _Walker, eqn: Any, invals: list, probes: Mapping | None, records: dict, here: tuple,
                   suffix: str) -> list:  # fmt: skip
    """A ``scan`` run step by step, so that every step's matches get their own probes."""
    prm = eqn.params
    consts, carry = invals[: prm["num_consts"]], invals[prm["num_consts"] : prm["num_consts"] + prm["num_carry"]]
    xs = invals[prm["num_consts"] + prm["num_carry"] :]
    closed, ys = prm["jaxpr"], {}
    for t in reversed(range(prm["length"])) if prm["reverse"] else range(prm["length"]):
        args = [*consts, *carry, *(x[t] for x in xs)]
        out = _evaluate(walker, closed.jaxpr, closed.consts, args, probes, records, here, f"{suffix}@{t}")
        carry, ys[t] = out[: prm["num_carry"]], out[prm["num_carry"] :]
    stacked = [jnp.stack([ys[t][i] for t in range(prm["length"])]) for i in range(len(eqn.outvars) - len(carry))]
    return [*carry, *stacked]


def _evaluate(
    walker: _Walker,
    jaxpr: Any,
    consts: list,
    args: list,
    probes: Mapping | None,
    records: dict,
    path: tuple = (),
    suffix: str = "",
) -> list:
    """Evaluate ``jaxpr`` equation by equation, recording the matched calls' structured inputs
    (keys ``layer#i`` plus a step ``suffix`` inside scans) and adding their probes."""
    env: dict = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for i, eqn in enumerate(jaxpr.eqns):
        here = (*path, i)
        invals = [read(v) for v in eqn.invars]
        if here in walker.inline:
            closed = eqn.params["jaxpr"]
            outvals = _evaluate(walker, closed.jaxpr, closed.consts, invals, probes, records, here, suffix)
        elif here in walker.scans:
            outvals = _evaluate_scan(walker, eqn, invals, probes, records, here, suffix)
        else:
            outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outvals = outvals if eqn.primitive.multiple_results else [outvals]
            match = walker.matches.get(here)
            if match is not None:
                records[match.use.key + suffix] = match.structured_input(invals)
                records[match.use.key + suffix + LAYER_OUTPUT] = match.canonical(outvals[0])
                if probes is not None:
                    outvals = [match.add_probe(outvals[0], probes[match.use.key + suffix])]
        env.update(zip(eqn.outvars, outvals))
    return [read(v) for v in jaxpr.outvars]


def capture(prepared: PreparedModel, x: Any) -> Capture:
    """Capture ``prepared.apply(params, x)`` on a batch of one ``x``."""
    apply, params = prepared.apply, prepared.params
    closed = jax.make_jaxpr(apply)(params, x)
    order = [path[0].key for path, _ in jax.tree_util.tree_flatten_with_path(dict(params))[0]]
    walker = _Walker()
    inputs = {var: _Origin(name, axes=tuple(range(var.aval.ndim))) for var, name in zip(closed.jaxpr.invars, order)}
    walker.walk(closed.jaxpr, inputs)
    # Calls of one parameter are summed, cross terms included, which needs its entries in one
    # layout in every call: the parameter itself everywhere, or the rules' own layouts (the
    # table in E[ids] and h·Eᵀ); x·W and y·Wᵀ are neither.
    calls: dict[str, list[_Match]] = {}
    for match in walker.matches.values():
        calls.setdefault(match.use.layer, []).append(match)
    for name, found in calls.items():
        if len(found) > 1 and not all(m.exact for m in found) and not all(m.use.native_layout for m in found):
            walker.excluded.setdefault(name, "is used several times, reshaped or transposed in some")
    walker.matches = {here: m for here, m in walker.matches.items() if m.use.layer not in walker.excluded}
    matches = walker.matches

    def apply_probed(p: Mapping[str, Any], probes: Mapping[str, Any], batch: Any) -> tuple[Any, dict]:
        records: dict = {}
        args = jax.tree_util.tree_leaves((dict(p), batch))
        out = _evaluate(walker, closed.jaxpr, closed.consts, args, probes, records)
        return out[0], records

    every = [(m, suffix) for here, m in matches.items() for suffix in walker.steps(here)]
    uses = tuple(dataclasses.replace(m.use, key=m.use.key + suffix) for m, suffix in every)
    shapes = {m.use.key + suffix: m.probe_shape for m, suffix in every}
    return Capture(uses, apply_probed, shapes, excluded=dict(sorted(walker.excluded.items())))
