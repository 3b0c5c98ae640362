"""Readout reduction: a model that ends in a wide linear layer f = A·h + b, A of shape (O, d)
with O > d, has the kernel

    Θ = A·Θ_h·Aᵀ + (h1·h2)·I_O [A trainable] + I_O [b trainable],

Θ_h the NTK of the d-dimensional h with respect to the body's parameters. Traced over the
outputs, tr(A·Θ_h·Aᵀ) = tr(R·Θ_h·Rᵀ) for A = Q·R (QR, R of d×d): the traced kernel of R·h, d
outputs instead of O. So a language model's logit kernel costs d cotangents per example (not O)
and the readout's own terms in closed form; nothing O-sized is formed before the output axes are
reduced. Every implementation computes the kernel of h (or R·h) as it would any kernel, and
``auto``'s cost model applies the reduction to an implementation where it predicts it cheaper
(untraced, Θ_h holds all d×d output pairs, which a diagonal over O = 1000 outputs of d = 256 does
not repay for Jacobian contraction).

The readout is found in the adapter's capture and proven to be one, never assumed:

- the last captured call is a dense layer with a 2-D weight (O, d) or (d, O), O > d, or a bias
  added alone right after one (JAX traces ``x @ W + b`` as two calls);
- f equals that call's output, in value on an example and in its derivative along a random
  tangent of every parameter (exactly: f is the same array, not a recomputation);
- f minus the matmul's output has a zero derivative along every parameter but the bias, so the
  body reaches f only through h (a branch added after the readout, as a zero-initialised
  adapter, is refused);
- h has a zero derivative along A and b, and A and b appear in no other captured call and no
  use outside their layer (trainable ones; frozen ones are constants, below): a trainable
  readout tied to an input embedding keeps the exact general path.

A frozen readout (``requires_grad=False``, Keras ``trainable=False``, a JAX leaf ``trainable=``
leaves out) is not a parameter of the kernel, so the capture of θ does not see it. The planner
then captures the model with every floating parameter as θ (the adapter's ``trainable=``) and
looks for the readout there; the parameters outside θ enter the body's capture as constants
(:attr:`Readout.constants`), and only the readout's trainable parts add their closed-form
terms: a frozen A gives Θ = A·Θ_h·Aᵀ (+ I for a trainable bias). A frozen A may be tied to an
input embedding (GPT-2's ``lm_head`` with ``wte`` frozen): it is a constant, so there is no
cross term.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._xp import namespace_of
from .arrays import zeros
from .axes import KernelAxes, Label, permute_to
from .contraction import contract
from .implementations.base import Cost, KernelCall, Method
from .model_shape import ModelShape
from .protocol import LAYER_OUTPUT, AutodiffBackend, Capture, LayerUse, Params
from .sizes import CallSizes


@dataclass(frozen=True, eq=False)
class Readout:
    """A model's final linear layer, found by :func:`find`.

    ``matmul`` is the call with the weight (named ``weight``, stored (O, d), or (d, O) when
    ``transposed``); ``bias`` the trainable bias (in that call, or added alone after it in
    ``bias_use``), ``None`` if there is none; ``width`` d and ``outputs`` O.
    """

    matmul: LayerUse
    weight: str
    bias: str | None
    bias_use: LayerUse | None
    transposed: bool
    width: int
    outputs: int
    tokens: tuple[int, ...] = ()  # f's axes before the last: h is (N, *tokens, d)
    capture: Capture | None = None  # found in a capture with every parameter as θ (a frozen readout)
    constants: Params = dataclasses.field(default_factory=dict)  # that capture's parameters outside θ

    @property
    def names(self) -> tuple[str, ...]:
        """The readout's parameters (frozen ones included: those are in :attr:`constants`)."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def trainable(self, params: Params) -> tuple[str, ...]:
        """The readout's parameters among ``params`` (θ of the kernel call)."""
        return tuple(n for n in self.names if n in params)

    @property
    def keys(self) -> tuple[str, ...]:
        """The captured calls the readout consists of."""
        return (self.matmul.key,) if self.bias_use is None else (self.matmul.key, self.bias_use.key)

    def describe(self) -> str:
        """The line ``explain`` shows."""
        frozen = self.weight in self.constants
        weight = "" if frozen else " + (h1·h2)·I"
        bias = "" if self.bias is None or self.bias in self.constants else " + I"
        return (
            f"readout {self.matmul.layer!r} (d = {self.width} -> O = {self.outputs}{', frozen' if frozen else ''}): "
            f"Θ = A·Θ_h·Aᵀ{weight}{bias}; an implementation marked 'readout reduced' differentiates the "
            f"{self.width}-dimensional h, not the {self.outputs} outputs"
        )

    def body_capture(self, capture: Capture, head: Params | None = None, mix: Any = None) -> Capture:
        """The capture of h = the readout's input as the model's output (h·mix with ``mix``, a
        d×d matrix). With ``head`` (the readout's trainable parameter values), its
        ``apply_probed`` runs; without, only its shapes are read. A readout found with every
        parameter as θ (:attr:`capture`) keeps the calls and exclusions of the body's θ only."""
        capture = self.capture or capture
        constants = self.constants
        uses, drop = [], set(self.keys)
        for use in capture.uses:
            roles = {r: n for r, n in use.params.items() if n not in constants}
            if use.key in drop or not roles:
                drop.add(use.key)
            else:
                uses.append(use if len(roles) == len(use.params) else dataclasses.replace(use, params=roles))
        shapes = {k: v for k, v in capture.output_shapes.items() if k not in drop}
        excluded = {n: why for n, why in capture.excluded.items() if n not in constants}
        body = dataclasses.replace(capture, uses=tuple(uses), output_shapes=shapes, excluded=excluded)
        if head is None:
            return body
        like = next(iter({**head, **constants}.values()))

        def apply_probed(params: Params, probes: Any, x: Any) -> tuple[Any, dict]:
            xp_ = namespace_of(like)
            still = zeros(xp_, {k: capture.output_shapes[k] for k in drop}, like)
            _, inputs = capture.apply_probed({**params, **constants, **head}, {**probes, **still}, x)
            h = inputs[self.matmul.key]
            h = xp_.reshape(h, (h.shape[0], *self.tokens, self.width))
            return (h if mix is None else xp_.matmul(h, mix)), inputs

        return dataclasses.replace(body, apply_probed=apply_probed)


def _random_like(backend: AutodiffBackend, params: Params, names: Any, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {n: backend.asarray(rng.standard_normal(tuple(params[n].shape)), like=params[n]) for n in names}


def _candidate(
    capture: Capture, params: Params, out_shape: tuple[int, ...], frozen: frozenset[str] = frozenset()
) -> Readout | None:
    """The readout the capture's last calls would form, from shapes alone (or ``None``); the
    ``frozen`` parameters are constants of the kernel, which may be used elsewhere too."""
    uses = list(capture.uses)
    if not uses or not out_shape:
        return None
    outputs = out_shape[-1]
    last, bias, bias_use = uses[-1], None, None
    if last.kind == "dense" and set(last.params) == {"weight"} and len(uses) > 1:
        shape = tuple(params[last.params["weight"]].shape)
        if shape == (outputs,) and uses[-2].kind == "dense":  # a bias added alone after the matmul
            bias, bias_use, last = last.params["weight"], last, uses[-2]
    if last.kind != "dense" or "weight" not in last.params or last.feature_axis not in (-1, len(out_shape)):
        return None
    if bias_use is None:
        bias = last.params.get("bias")
    elif "bias" in last.params:
        return None
    weight = last.params["weight"]
    shape = tuple(params[weight].shape)
    produced = capture.output_shapes[last.key]  # (1, *tokens, O), tokens perhaps flattened
    if (
        len(shape) != 2
        or outputs not in shape
        or produced[-1] != outputs
        or math.prod(produced) != math.prod(out_shape)
    ):
        return None
    width = shape[1] if shape[0] == outputs else shape[0]
    if width >= outputs:
        return None
    head = ({weight} | ({bias} if bias else set())) - frozen
    readout_keys = {last.key} | ({bias_use.key} if bias_use else set())
    if head & set(capture.excluded) or any(head & set(u.params.values()) for u in uses if u.key not in readout_keys):
        return None
    return Readout(last, weight, bias, bias_use, shape[0] != outputs, width, outputs, tuple(out_shape[:-1]))


def find(
    backend: AutodiffBackend,
    capture: Capture,
    params: Params,
    x: Any,
    out_shape: tuple[int, ...],
    frozen: frozenset[str] = frozenset(),
) -> Readout | None:
    """The model's readout (see the module docstring), or ``None``; ``x`` is a batch of one.
    ``frozen`` names the parameters of ``params`` that are constants of the kernel (the capture
    then has every parameter as θ): the readout is returned with them as its constants."""
    readout = _candidate(capture, params, out_shape, frozen)
    if readout is None:
        return None
    xp = backend.namespace(x)
    probes = zeros(xp, capture.output_shapes, next(iter(params.values())))
    last = readout.bias_use or readout.matmul

    def residuals(p: Params) -> Any:
        out, inputs = capture.apply_probed(p, probes, x)
        return (
            out,
            inputs[last.key + LAYER_OUTPUT],
            inputs[readout.matmul.key + LAYER_OUTPUT],
            inputs[readout.matmul.key],
        )

    out, y_last, _, h = residuals(params)
    if tuple(h.shape)[-1] != readout.width or math.prod(h.shape) != readout.width * math.prod(out_shape[:-1]):
        return None
    if not np.array_equal(backend.to_numpy(out), np.reshape(backend.to_numpy(y_last), tuple(out.shape))):
        return None

    def minus(r: tuple, i: int) -> Any:
        return r[0] - xp.reshape(r[i], tuple(r[0].shape))

    checks = (  # (parameters moved, what must not move)
        (list(params), lambda p: minus(residuals({**params, **p}), 1)),
        ([n for n in params if n != readout.bias], lambda p: minus(residuals({**params, **p}), 2)),
        ([n for n in readout.names if n not in frozen], lambda p: residuals({**params, **p})[3]),
    )
    for seed, (names, fn) in enumerate(checks):
        if not names:
            continue
        tangent = _random_like(backend, params, names, seed)
        _, moved = backend.jvp(fn, {n: params[n] for n in names}, tangent)
        if np.any(backend.to_numpy(moved) != 0):
            return None
    if not frozen:
        return readout
    return dataclasses.replace(readout, capture=capture, constants={n: params[n] for n in frozen})


def _apply_of(backend: AutodiffBackend, capture: Capture, like: Any) -> Any:
    """``apply(params, x)`` of a body capture: its output with no probe moved, for any batch."""

    def single(p: Params, x: Any) -> Any:
        return capture.apply_probed(p, zeros(backend.namespace(x), capture.output_shapes, like), x)[0]

    def apply(p: Params, x: Any) -> Any:
        if x.shape[0] == 1:
            return single(p, x)
        return backend.vmap(lambda x_i: single(p, x_i[None, ...])[0, ...], (0,))(x)

    return apply


def body_axes(axes: KernelAxes) -> KernelAxes:
    """The axes of Θ_h: f's, with the last (feature) axis kept on both sides."""
    last = axes.ndim - 1
    return KernelAxes(
        axes.ndim, tuple(a for a in axes.trace if a != last), tuple(a for a in axes.diagonal if a != last)
    )


def _sandwich(xp: Any, theta_h: Any, a: Any, axes: KernelAxes) -> tuple[Any, list[Label]]:
    """A·Θ_h·Aᵀ on the last axis pair, reduced as ``axes`` asks; returns it and its labels."""
    last, inner = axes.ndim - 1, body_axes(axes)
    labels = inner.final_labels()
    rest = [label for label in labels if label not in ((1, last), (2, last))]
    t = permute_to(xp, theta_h, labels, [*rest, (1, last), (2, last)])  # (..., d, d)
    a_t = xp.permute_dims(a, (1, 0))  # (d, O)
    if last in axes.trace:  # Σ_ij Θ_h[i, j] (AᵀA)[i, j]
        gram = xp.matmul(a_t, a)
        return xp.sum(t * gram, axis=(-2, -1)), rest
    right = xp.matmul(t, a_t)  # (..., d, O): Σ_j Θ_h[i, j] A[o, j]
    if last in axes.diagonal:
        return xp.sum(right * a_t, axis=-2), [*rest, ("d", last)]
    return xp.matmul(a, right), [*rest, (1, last), (2, last)]


def _token_axes(axes: KernelAxes) -> KernelAxes:
    """The axes of f without its last (feature) axis: the readout's token axes."""
    inner = body_axes(axes)
    return KernelAxes(axes.ndim - 1, inner.trace, inner.diagonal)


def _head_terms(
    xp: Any, h1: Any, h2: Any, axes: KernelAxes, outputs: int, *, weight: bool, bias: bool
) -> tuple[Any, list[Label]]:
    """(h1·h2)·I_O [``weight``] + I_O [``bias``], reduced as ``axes`` asks; with its labels."""
    last, tokens = axes.ndim - 1, _token_axes(axes)
    parts1, parts2 = ([h1], [h2]) if weight else ([], [])
    if bias:
        parts1.append(xp.ones((*h1.shape[:-1], 1), dtype=h1.dtype))
        parts2.append(xp.ones((*h2.shape[:-1], 1), dtype=h2.dtype))
    a1, a2 = (xp.concat(parts1, axis=-1), xp.concat(parts2, axis=-1)) if len(parts1) > 1 else (parts1[0], parts2[0])
    gram = contract(xp, {"h": a1}, {"h": a2}, tokens, tuple(a1.shape[:-1]), tuple(a2.shape[:-1]))
    labels = tokens.final_labels()
    if last in axes.trace:
        return gram * outputs, labels
    if last in axes.diagonal:
        return xp.reshape(gram, (*gram.shape, 1)) * xp.ones((outputs,), dtype=gram.dtype), [*labels, ("d", last)]
    eye = xp.eye(outputs, dtype=gram.dtype)
    return xp.reshape(gram, (*gram.shape, 1, 1)) * eye, [*labels, (1, last), (2, last)]


class Reduced(Method):
    """An implementation computing the kernel of the readout's input h; the readout added exactly."""

    uses_capture = True
    batch_coupled = False

    def __init__(self, inner: Method, readout: Readout) -> None:
        self.inner, self.readout = inner, readout
        self.name, self.label, self.title = inner.name, inner.label, inner.title

    @property
    def key(self) -> tuple:
        return (self.inner.key, type(self))

    def _body(self, call: KernelCall, params: Params) -> tuple[KernelCall, Params, Params]:
        """The kernel call of h (of R·h when the outputs are traced), the body's parameters and
        the readout's."""
        readout, xp = self.readout, call.backend.namespace(next(iter(params.values())))
        head = {n: params[n] for n in readout.trainable(params)}
        body = {n: v for n, v in params.items() if n not in head}
        traced = call.axes.ndim - 1 in call.axes.trace
        mix = xp.permute_dims(xp.linalg.qr(self._a(xp, head))[1], (1, 0)) if traced else None  # h·Rᵀ
        capture = readout.body_capture(call.capture, head, mix)
        axes = call.axes if traced else body_axes(call.axes)
        out_h = (*call.out_shape[:-1], readout.width)
        apply = _apply_of(call.backend, capture, self._like(head))
        return KernelCall(call.backend, apply, axes, out_h, False, capture), body, head

    def _like(self, head: Params) -> Any:
        """An array of the readout's dtype and device."""
        return next(iter({**head, **self.readout.constants}.values()))

    def _a(self, xp: Any, head: Params) -> Any:
        """A as (O, d)."""
        a = {**self.readout.constants, **head}[self.readout.weight]
        return xp.permute_dims(a, (1, 0)) if self.readout.transposed else a

    def _from_body(self, call: KernelCall, part: Any, head: Params) -> Any:
        """A body kernel (of h, or of R·h when traced) as the kernel of f's outputs."""
        xp = call.backend.namespace(part)
        if call.axes.ndim - 1 in call.axes.trace:
            return part
        sandwich, labels = _sandwich(xp, part, self._a(xp, head), call.axes)
        return permute_to(xp, sandwich, labels, call.axes.final_labels())

    def _head(self, call: KernelCall, h1: Any, h2: Any, *, weight: bool, bias: bool) -> Any:
        """The readout's own terms, in the kernel's axis order."""
        xp = call.backend.namespace(h1)
        terms, labels = _head_terms(xp, h1, h2, call.axes, self.readout.outputs, weight=weight, bias=bias)
        return permute_to(xp, terms, labels, call.axes.final_labels())

    def _inputs(
        self, call: KernelCall, inner: KernelCall, body: Params, head: Params, x1: Any, x2: Any
    ) -> tuple[Any, Any]:
        """h on both sides: the readout's input itself, also when ``inner`` is the kernel of R·h."""
        apply = inner.apply
        if call.axes.ndim - 1 in call.axes.trace:
            apply = _apply_of(call.backend, self.readout.body_capture(call.capture, head), self._like(head))
        h1 = apply(body, x1)
        return h1, h1 if x2 is None else apply(body, x2)

    def kernel(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> Any:
        inner_call, body, head = self._body(call, params)
        readout = self.readout
        parts = [self._from_body(call, self.inner.kernel(inner_call, body, x1, x2), head)] if body else []
        if head:
            h1, h2 = self._inputs(call, inner_call, body, head, x1, x2)
            weight, bias = readout.weight in head, readout.bias is not None and readout.bias in head
            parts.append(self._head(call, h1, h2, weight=weight, bias=bias))
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def per_layer(self, call: KernelCall, params: Params, x1: Any, x2: Any, layers: Any) -> dict[str, Any]:
        """The body's layers through the readout; the readout's weight and bias terms in closed form."""
        inner_call, body, head = self._body(call, params)
        body_layers = {k: [n for n in v if n in body] for k, v in layers.items()}
        body_layers = {k: v for k, v in body_layers.items() if v}
        parts = self.inner.per_layer(inner_call, body, x1, x2, body_layers) if body_layers else {}
        result = {k: self._from_body(call, part, head) for k, part in parts.items()}
        h1, h2 = self._inputs(call, inner_call, body, head, x1, x2) if head else (None, None)
        for name in head:
            term = self._head(call, h1, h2, weight=name == self.readout.weight, bias=name == self.readout.bias)
            layer = next(k for k, v in layers.items() if name in v)
            result[layer] = term if layer not in result else result[layer] + term
        return {k: result[k] for k in layers}

    def cost(self, shape: ModelShape, sizes: CallSizes, itemsize: int) -> Cost:
        """The inner implementation's cost on the body (``shape`` is the body's) with d outputs,
        then the readout: traced, a QR of A and h·Rᵀ; otherwise the sandwich, two matmuls per
        d×d block of Θ_h (one and a product with A when the outputs are diagonal); and the Gram
        of h for the readout's own terms."""
        d, o, axes = self.readout.width, self.readout.outputs, sizes.axes
        traced = axes.ndim - 1 in axes.trace
        inner = CallSizes(
            sizes.n1, sizes.n2, sizes.reuse, (*sizes.out_shape[:-1], d), axes if traced else body_axes(axes)
        )
        cost = self.inner.cost(shape, inner, itemsize) if shape.params else Cost(0.0, 0.0, 0.0, 0.0)
        tokens = math.prod(sizes.out_shape[:-1])
        blocks = sizes.examples * inner.entries / max(inner.examples * d * (1 if traced else d), 1)
        if traced:
            readout = 4.0 * o * d * d + 2.0 * sizes.nx * tokens * d * d
        elif axes.ndim - 1 in axes.diagonal:
            readout = 2.0 * blocks * (d * d * o + d * o)
        else:
            readout = 2.0 * blocks * (d * d * o + d * o * o)
        head = 2.0 * blocks * (d + 1)
        passes = cost.passes + sizes.nx * shape.forward_flops  # h, once more
        peak = cost.peak + inner.entries + sizes.entries
        return Cost(passes, cost.contraction + readout + head, peak, cost.traffic + sizes.entries)
