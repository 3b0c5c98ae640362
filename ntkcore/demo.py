"""``ntkcore demo``: one MLP in every installed framework, every implementation, cross-checked.

The frameworks are imported here on purpose (the user asked for all of them); the core
modules never import one.
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
from .implementations import AUTO, REGISTRY
from .registry import BUILTIN, get_backend, installed_backends

# every implementation but those that need the layer capture (the demo's MLP is all dense), and auto
IMPLEMENTATIONS = (*(name for name, method in REGISTRY.items() if not method.uses_capture), AUTO)


@dataclass
class Row:
    backend: str
    implementation: str
    first_s: float
    median_s: float
    kernel: np.ndarray


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


def run(
    backends: list[str] | None = None,
    widths: tuple[int, ...] = (32, 256, 256, 10),
    n: int = 16,
    repeats: int = 3,
    dtype: str = "float32",
) -> tuple[list[Row], float]:
    """Time every backend × implementation; return the rows and the largest relative difference."""
    names = [b for b in BUILTIN if b in (backends or installed_backends())]  # torch before TensorFlow
    weights = demo_weights(list(widths))
    x = np.random.default_rng(1).normal(size=(n, widths[0])).astype(dtype)
    rows = []
    for name in names:
        backend = get_backend(name)
        model, kwargs = importlib.import_module(f"ntkcore_{name}.demo").build_mlp(weights, dtype)
        for implementation in IMPLEMENTATIONS:
            kernel_fn = ntk_fn(model, implementation=implementation, backend=name, **kwargs)
            kernel, first, median = time_calls(lambda b=backend, f=kernel_fn: b.to_numpy(f(x)), repeats)
            rows.append(Row(name, implementation, first, median, kernel))
    reference = rows[0].kernel
    scale = float(np.max(np.abs(reference)))
    largest = max(float(np.max(np.abs(r.kernel - reference))) / scale for r in rows)
    return rows, largest


def format_table(rows: list[Row], largest: float, widths: tuple[int, ...], n: int) -> str:
    reference = rows[0].kernel
    scale = float(np.max(np.abs(reference)))
    lines = [
        f"NTK of an MLP {'-'.join(map(str, widths))} on N={n} inputs, kernel shape {reference.shape}, float32",
        f"{'backend':<11} {'implementation':<21} {'first call':>11} {'median':>10} {'max rel. diff':>14}",
    ]
    for r in rows:
        diff = float(np.max(np.abs(r.kernel - reference))) / scale
        lines.append(
            f"{r.backend:<11} {r.implementation:<21} {r.first_s * 1e3:>9.1f}ms {r.median_s * 1e3:>8.1f}ms {diff:>14.2e}"
        )
    lines.append(f"largest difference across frameworks and implementations: {largest:.2e} (relative to max |Θ|)")
    return "\n".join(lines)
