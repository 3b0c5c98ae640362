"""``ntkcore demo``: one MLP in every installed framework, every implementation, cross-checked.

The first framework's MLP is built from seeded weights; each other framework's starts from
other random weights and gets the first one's by :func:`ntkcore.transfer`, as a user porting a
model would. Every implementation then runs in every framework, and :func:`ntkcore.crosscheck`
compares the frameworks. The frameworks are imported here on purpose (the user asked for all
of them); the core modules never import one.
"""

from __future__ import annotations

import importlib
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .api import ntk_fn
from .crosscheck import CrosscheckReport, crosscheck
from .implementations import AUTO, REGISTRY
from .registry import BUILTIN, get_backend, installed_backends
from .transfer import transfer

IMPLEMENTATIONS = (*REGISTRY, AUTO)


@dataclass
class Row:
    backend: str
    implementation: str
    first_s: float
    median_s: float
    kernel: np.ndarray
    picked: str = ""  # auto's row: the implementation it ran


def time_calls(call: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float, float]:
    """(first result, first-call seconds, median seconds of ``repeats`` further calls).

    ``call`` must return host data (a numpy copy), so that asynchronous frameworks are timed
    to completion.
    """
    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return result, first, statistics.median(times)


def demo_weights(widths: list[int], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised dense weights (in, out) and small biases, from a seeded numpy RNG."""
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(a, b)) * np.sqrt(2.0 / a), 0.1 * rng.normal(size=(b,))) for a, b in itertools.pairwise(widths)
    ]


def _models(names: list[str], widths: tuple[int, ...], dtype: str) -> dict[str, tuple[object, dict]]:
    """name -> (model, ntk keyword arguments): the first from seeded weights, the others from
    other weights, then given the first one's by :func:`ntkcore.transfer`."""
    models = {}
    for i, name in enumerate(names):
        builder = importlib.import_module(f"ntkcore_{name}.demo").build_mlp
        model, kwargs = builder(demo_weights(list(widths), seed=i), dtype)
        if i:
            first, first_kwargs = models[names[0]]
            moved = transfer(first, model, source_params=first_kwargs.get("params"), target_params=kwargs.get("params"))
            kwargs = {**kwargs, "params": moved} if "params" in kwargs else kwargs
        models[name] = (model, kwargs)
    return models


def run(
    backends: list[str] | None = None,
    widths: tuple[int, ...] = (32, 256, 256, 10),
    n: int = 16,
    repeats: int = 3,
    dtype: str = "float32",
) -> tuple[list[Row], float, CrosscheckReport]:
    """Time every backend × implementation; return the rows, the largest relative difference from
    the first row (the first framework's Jacobian contraction) and the frameworks' crosscheck."""
    names = [b for b in BUILTIN if b in (backends or installed_backends())]  # torch before TensorFlow
    x = np.random.default_rng(1).normal(size=(n, widths[0])).astype(dtype)
    models = _models(names, widths, dtype)
    rows = []
    for name, (model, kwargs) in models.items():
        backend = get_backend(name)
        for implementation in IMPLEMENTATIONS:
            kernel_fn = ntk_fn(model, implementation=implementation, backend=name, **kwargs)
            kernel, first, median = time_calls(lambda b=backend, f=kernel_fn: b.to_numpy(f(x)), repeats)
            picked = kernel_fn.explain(x).choice if implementation == AUTO else ""
            rows.append(Row(name, implementation, first, median, kernel, picked or ""))
    reference = rows[0].kernel
    scale = float(np.max(np.abs(reference)))
    largest = max(float(np.max(np.abs(r.kernel - reference))) / scale for r in rows)
    report = crosscheck({name: (m, kw.get("params")) for name, (m, kw) in models.items()}, x)
    return rows, largest, report


def format_table(rows: list[Row], largest: float, widths: tuple[int, ...], n: int) -> str:
    reference = rows[0].kernel
    scale = float(np.max(np.abs(reference)))
    lines = [
        f"NTK of an MLP {'-'.join(map(str, widths))} on N={n} inputs, kernel shape {reference.shape}, float32",
        f"weights: {rows[0].backend}'s, copied into the other frameworks by ntkcore.transfer",
        f"differences: max |Θ - Θ_ref| / max |Θ_ref|, Θ_ref = {rows[0].backend} {rows[0].implementation}",
        f"{'backend':<11} {'implementation':<21} {'first call':>11} {'median':>10} {'max rel. diff':>14}",
    ]
    for r in rows:
        diff = float(np.max(np.abs(r.kernel - reference))) / scale
        picked = f"  (auto ran {r.picked})" if r.picked else ""
        lines.append(
            f"{r.backend:<11} {r.implementation:<21} {r.first_s * 1e3:>9.1f}ms {r.median_s * 1e3:>8.1f}ms "
            f"{diff:>14.2e}{picked}"
        )
    lines.append(f"largest difference across frameworks and implementations: {largest:.2e}")
    return "\n".join(lines)


NEXT_STEPS = """\
The same on your own model, in three lines:
    ported = ntkcore.transfer(torch_model, keras_model)   # weights copied, layouts converted
    report = ntkcore.crosscheck({"torch": torch_model, "keras": ported}, x)
    print(report)         # or from a shell: ntkcore crosscheck --model ... --transfer-from torch"""
