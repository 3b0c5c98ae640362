"""One model written in several frameworks, checked against itself: outputs and kernels of each,
in one process, compared pair by pair; where they differ, the models' layers are compared in
call order (each layer's output and its per-layer kernel), naming the first layer whose output
differs.

Differences are relative to the larger of the two arrays' largest entries (max |a - b| / max
|a|, |b|), so one number reads the same for outputs and kernels of any scale.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .api import ntk_fn
from .arrays import device_of, layer_name
from .implementations import REGISTRY
from .protocol import LAYER_OUTPUT
from .registry import backend_for_arrays, detect_backend

# float32 kernels of one model agree across frameworks to ~1e-6 of their largest entry (sums in
# different orders over O·P products); 1e-4 leaves room for deep models while a wrong layer, a
# changed activation or one perturbed weight shows at 1e-3 or more. float64: rounding is ~1e-14.
RTOL = {"float32": 1e-4, "float64": 1e-9}


@dataclass(frozen=True)
class Pair:
    """Two models' relative differences of outputs and kernels."""

    first: str
    second: str
    outputs: float
    kernel: float


@dataclass(frozen=True)
class LayerDifference:
    """One aligned layer: its name in each model; the relative difference of its output (first
    call, first examples) from the first model's, and of its kernel contribution (relative to
    the first model's whole kernel)."""

    index: int
    names: Mapping[str, str]
    output: Mapping[str, float]
    kernel: Mapping[str, float]


@dataclass
class CrosscheckReport:
    """What :func:`crosscheck` found; ``str()`` is a readable table."""

    models: list[str]
    rtol: float
    pairs: list[Pair]
    seconds: dict[str, float]
    implementations: dict[str, str]
    within: dict[str, dict[str, float]] = field(default_factory=dict)  # implementation="all"
    layers: list[LayerDifference] | None = None
    layer_note: str = ""

    @property
    def max_rel_diff(self) -> float:
        found = [max(p.outputs, p.kernel) for p in self.pairs]
        found += [d for diffs in self.within.values() for d in diffs.values()]
        return max(found, default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_rel_diff <= self.rtol

    @property
    def first_differing_layer(self) -> LayerDifference | None:
        """The first layer, in call order, whose output differs: the difference arises in it (its
        weights, its own computation) or in what runs between it and the layer before (an
        activation). Every layer's kernel contribution may differ, through the backward pass."""
        for layer in self.layers or ():
            if max(layer.output.values(), default=0.0) > self.rtol:
                return layer
        return None

    def __str__(self) -> str:
        width = max(len(m) for m in self.models)
        lines = [
            f"ntkcore crosscheck: {len(self.models)} models, rtol {self.rtol:g} — {'AGREE' if self.ok else 'DIFFER'}"
        ]
        lines.append(f"{'model':<{width}}  {'implementation':<22} {'seconds':>8}")
        for m in self.models:
            lines.append(f"{m:<{width}}  {self.implementations[m]:<22} {self.seconds[m]:>8.3f}")
        lines.append(f"{'pair':<{2 * width + 4}} {'outputs':>10} {'kernel':>10}")
        for p in self.pairs:
            verdict = "" if max(p.outputs, p.kernel) <= self.rtol else "  <- differs"
            lines.append(
                f"{p.first + ' vs ' + p.second:<{2 * width + 4}} {p.outputs:>10.2e} {p.kernel:>10.2e}{verdict}"
            )
        for m, diffs in self.within.items():
            for name, d in diffs.items():
                lines.append(
                    f"{m}: {name} vs the first implementation {d:.2e}{'  <- differs' if d > self.rtol else ''}"
                )
        if self.layers:
            lines.append("layer by layer, against " + self.models[0] + " (output, kernel contribution):")
            for layer in self.layers:
                where = ", ".join(f"{m} {n!r}" for m, n in layer.names.items())
                diffs = ", ".join(f"{layer.output[m]:.1e} / {layer.kernel[m]:.1e}" for m in layer.output)
                lines.append(f"  #{layer.index} {where}: {diffs}")
        first = self.first_differing_layer
        if first is not None:
            where = ", ".join(f"{m} {n!r}" for m, n in first.names.items())
            before = "the layer before agrees" if first.index else "it is the first layer"
            lines.append(
                f"first layer whose output differs: #{first.index} ({where}); {before}, so the difference is in "
                "this layer (its weights or its computation) or in what runs just before it (an activation)"
            )
        elif self.layers is not None and not self.ok:
            lines.append("every layer's output agrees: the difference is in the derivatives or after the last layer")
        elif self.layer_note:
            lines.append(self.layer_note)
        return "\n".join(lines)


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def _host(x: Any) -> Any:
    """``x`` as numpy, whatever framework it came from (each model gets it in its own)."""
    if x is None or isinstance(x, np.ndarray):
        return x
    backend = backend_for_arrays(x)
    return backend.to_numpy(x) if backend is not None else np.asarray(x)


def _unpack(entry: Any) -> tuple[Any, Any]:
    return entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)


EXAMPLES = 4  # examples whose layer outputs are compared (one forward pass each)


def _first_calls(uses: Any) -> list[tuple[str, Any]]:
    """(layer, the last captured piece of its first call) in call order: a JAX dense layer is its
    matmul then its bias; a layer called again later (shared weights, RNN steps) counts once."""
    closed: set[str] = set()
    current, pieces = None, {}
    for use in uses:
        layer = layer_name(next(iter(use.params.values())))
        if layer in closed:
            continue
        if layer != current:
            closed.update([current] if current is not None else [])
            current = layer
        pieces[layer] = use
    return list(pieces.items())


def _layer_outputs(kernel: Any, x: np.ndarray) -> list[tuple[str, np.ndarray]] | None:
    """(layer, its output on the first examples as (N, tokens, features)) in call order, from
    the adapter's capture; ``None`` where the model cannot be captured."""
    backend, prepared = kernel.backend, kernel.prepared
    like = next(iter(prepared.params.values()))
    try:
        capture = kernel.capture(backend.asarray(x[:1], like=like))
    except Exception:  # no capture: nothing to localise with
        return None
    xp, device = backend.namespace(like), device_of(like)
    kwargs = {} if device is None else {"device": device}
    zeros = {k: xp.zeros(shape, dtype=like.dtype, **kwargs) for k, shape in capture.output_shapes.items()}
    calls = _first_calls(capture.uses)
    found: dict[str, list[np.ndarray]] = {layer: [] for layer, _ in calls}
    for i in range(min(len(x), EXAMPLES)):
        _, records = capture.apply_probed(prepared.params, zeros, backend.asarray(x[i : i + 1], like=like))
        for layer, use in calls:
            out = np.moveaxis(backend.to_numpy(records[use.key + LAYER_OUTPUT]), use.feature_axis, -1)
            found[layer].append(out.reshape(-1, out.shape[-1]))
    return [(layer, np.stack(pieces)) for layer, pieces in found.items()]


def crosscheck(
    models: Mapping[str, Any],
    x1: Any,
    x2: Any = None,
    *,
    implementation: str = "auto",
    rtol: float | None = None,
    **ntk_options: Any,
) -> CrosscheckReport:
    """Outputs and kernels of one architecture in several frameworks, compared in one process.

    ``models``: name -> a model, or ``(apply, params)`` for a JAX function. ``x1``, ``x2``:
    inputs as numpy (or any framework's) arrays, given to each model in its own framework.
    ``implementation="all"`` also checks every implementation against the others within each
    framework. ``rtol`` defaults to 1e-4 when any model is float32, else 1e-9. When the models
    differ, their layers are compared in call order (outputs on the first examples, per-layer
    kernels), and the report names the first layer whose output differs.
    """
    if len(models) < 1:
        raise ValueError("models must name at least one model")
    x1, x2 = _host(x1), _host(x2)
    methods = list(REGISTRY) if implementation == "all" else [implementation]
    outputs, kernels, seconds, chosen, within, fns = {}, {}, {}, {}, {}, {}
    for name, entry in models.items():
        model, params = _unpack(entry)
        backend = detect_backend(model, params, ())
        results = {}
        for method in methods:
            fn = ntk_fn(model, params=params, implementation=method, backend=backend.name, **ntk_options)
            start = time.perf_counter()
            results[method] = backend.to_numpy(fn(x1, x2))
            seconds.setdefault(name, time.perf_counter() - start)
            fns.setdefault(name, fn)
        chosen[name] = fns[name].explain(x1, x2).choice if implementation == "auto" else methods[0]
        kernels[name] = results[methods[0]]
        if len(methods) > 1:
            within[name] = {m: _difference(results[m], kernels[name]) for m in methods[1:]}
        prepared = fns[name].prepared
        native = backend.asarray(x1, like=next(iter(prepared.params.values())))
        outputs[name] = backend.to_numpy(prepared.apply(prepared.params, native))
    names = list(models)
    pairs = [
        Pair(a, b, _difference(outputs[a], outputs[b]), _difference(kernels[a], kernels[b]))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    dtypes = {fns[n].dtype_name for n in names}
    report = CrosscheckReport(
        names, rtol if rtol is not None else RTOL["float32" if "float32" in dtypes else "float64"], pairs, seconds,
        chosen, within,
    )  # fmt: skip
    if not report.ok and len(names) > 1:
        _add_layers(report, models, fns, x1, x2, kernels[names[0]], implementation, ntk_options)
    return report


def _add_layers(report: CrosscheckReport, models: Mapping, fns: dict, x1: Any, x2: Any, reference: np.ndarray,
                implementation: str, ntk_options: dict) -> None:  # fmt: skip
    """Layer by layer, in call order, against the first model: the outputs on the first examples,
    and the per-layer kernels."""
    outputs = {name: _layer_outputs(fns[name], x1) for name in models}
    if any(found is None for found in outputs.values()):
        report.layer_note = "layers not compared: a model could not be captured layer by layer"
        return
    counts = {name: len(found) for name, found in outputs.items()}
    if len(set(counts.values())) > 1:
        report.layer_note = f"layers not compared: the models have different numbers of captured layers {counts}"
        return
    per_layer = {}
    method = "jacobian_contraction" if implementation == "all" else implementation
    for name, entry in models.items():
        model, params = _unpack(entry)
        fn = ntk_fn(model, params=params, implementation=method, backend=fns[name].backend.name, per_layer=True,
                    **ntk_options)  # fmt: skip
        per_layer[name] = {k: fns[name].backend.to_numpy(v) for k, v in fn(x1, x2).items()}
    first, scale = report.models[0], max(float(np.max(np.abs(reference), initial=0.0)), 1e-300)
    report.layers = []
    for i in range(counts[first]):
        names = {name: outputs[name][i][0] for name in report.models}
        kernels = {name: per_layer[name].get(names[name]) for name in report.models}
        report.layers.append(
            LayerDifference(
                i,
                names,
                {name: _difference(outputs[name][i][1], outputs[first][i][1]) for name in report.models[1:]},
                {
                    name: float(np.max(np.abs(kernels[name] - kernels[first]), initial=0.0)) / scale
                    if kernels[name] is not None and kernels[first] is not None
                    else float("nan")
                    for name in report.models[1:]
                },
            )
        )
