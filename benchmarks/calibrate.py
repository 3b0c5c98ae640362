"""Fit the cost model's constants to a benchmark run, and report how ``"auto"`` chooses.

    python -m benchmarks.calibrate [--results benchmarks/results/bench.json] [--update later.json] [--write]

For every ntkcore measurement of the run (workloads and sweep points), the cost model's terms
come from ``ntkcore.explain`` on the same model and inputs (nothing computed): layer calls,
pass FLOPs, contraction FLOPs and bytes streamed of each implementation. Per backend, on the run's device
class, a non-negative least-squares fit of the relative time error gives

    seconds = overhead[impl] + layer calls × per-layer overhead[impl] + pass FLOPs / pass rate[impl]
              + contraction FLOPs / matmul rate + bytes streamed / bandwidth

``--write`` stores the constants in ``ntkcore/calibration.json`` (package data) and the
calibration table in ``benchmarks/RESULTS.md``: per workload × backend the measured time of
every implementation, auto's choice, auto / fastest, and whether the predicted ranking matches
the measured one. Choices are shown in-sample and held out (fitted without that workload's
measurements), so the table says how the fit generalises, not only how it fits.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from benchmarks import report
from benchmarks.child import _to_framework
from benchmarks.workloads import ALL, WORKLOADS, build, inputs, weights
from ntkcore.cost_model import device_class
from ntkcore.implementations import REGISTRY

METHODS = tuple(REGISTRY)
SHORT = {name: method.label for name, method in REGISTRY.items()}
K = len(METHODS)


def markers(device: str) -> tuple[str, str]:
    """The RESULTS.md markers of one device class's calibration section."""
    tag = "" if device == "cpu" else f" ({device})"
    return (
        f"<!-- begin: written by `python -m benchmarks.calibrate`{tag}; do not edit by hand -->",
        f"<!-- end: written by `python -m benchmarks.calibrate`{tag} -->",
    )


TARGET = 1.25  # auto within this factor of the fastest measured implementation
MAX_RATE = 1e16  # a coefficient fitted to zero: the term is negligible, not free


def features(backend: str, workload: str) -> dict[str, dict]:
    """Per implementation, the cost model's terms for this workload in this backend."""
    import ntkcore

    w = ALL[workload]
    model, kwargs = build(backend, w, weights(w))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = ntkcore.explain(model, _to_framework(backend, inputs(w)), **w.axes, **kwargs)
    return {name: {**e.terms, "device": explanation.device} for name, e in explanation.estimates.items()}


def _row(method: str, terms: dict) -> np.ndarray:
    """The regression row: [overhead ×K, layer calls ×K, pass FLOPs ×K, contraction FLOPs, bytes]."""
    row = np.zeros(3 * K + 2)
    i = METHODS.index(method)
    row[i] = 1.0
    row[K + i] = terms["layers"]
    row[2 * K + i] = terms["passes"]
    row[3 * K] = terms["contraction"]
    row[3 * K + 1] = terms["traffic"]
    return row


def fit(points: list[tuple[str, dict, float]]) -> dict:
    """Constants minimising Σ ((predicted − measured) / measured)², all coefficients ≥ 0."""
    a = np.array([_row(m, terms) / t for m, terms, t in points])
    scale = np.maximum(np.abs(a).max(axis=0), 1e-300)  # columns of 1 and of 1e12 FLOPs
    coef, _ = nnls(a / scale, np.ones(len(points)))
    coef = coef / scale
    rate = lambda c: min(MAX_RATE, 1.0 / c) if c > 0 else MAX_RATE  # noqa: E731
    return {
        "overhead_s": {m: float(coef[i]) for i, m in enumerate(METHODS)},
        "per_layer_s": {m: float(coef[K + i]) for i, m in enumerate(METHODS)},
        "pass_flops_per_s": {m: float(rate(coef[2 * K + i])) for i, m in enumerate(METHODS)},
        "matmul_flops_per_s": float(rate(coef[3 * K])),
        "bytes_per_s": float(rate(coef[3 * K + 1])),
    }


def predict(constants: dict, method: str, terms: dict) -> float:
    return (
        constants["overhead_s"][method]
        + terms["layers"] * constants["per_layer_s"][method]
        + terms["passes"] / constants["pass_flops_per_s"][method]
        + terms["contraction"] / constants["matmul_flops_per_s"]
        + terms["traffic"] / constants["bytes_per_s"]
    )


def collect(results: list[dict]) -> dict:
    """``(backend, workload) -> {method: (terms, measured seconds)}`` for ntkcore's results."""
    table: dict = defaultdict(dict)
    cache: dict = {}
    for r in results:
        if r["runner"] != "ntkcore" or r["implementation"] not in METHODS or r["workload"] not in ALL:
            continue
        key = (r["backend"], r["workload"])
        if key not in cache:
            cache[key] = features(*key)
        # the cost model's terms do not depend on the device; the constants fitted do
        terms = {**cache[key][r["implementation"]], "device": device_class(r.get("device", "cpu"))}
        table[key][r["implementation"]] = (terms, r["median_s"])
    return table


def calibrate(table: dict) -> tuple[dict, list[dict]]:
    """Fitted constants per ``backend/device`` and the per-workload evaluation rows."""
    by_backend: dict = defaultdict(list)
    for (backend, workload), methods in table.items():
        for method, (terms, seconds) in methods.items():
            by_backend[(backend, terms["device"])].append((workload, method, terms, seconds))
    constants, rows = {}, []
    for (backend, device), points in sorted(by_backend.items()):
        constants[f"{backend}/{device}"] = fit([(m, terms, t) for _, m, terms, t in points])
        for workload in WORKLOADS:
            measured = table.get((backend, workload))
            if not measured:
                continue
            held_out = fit([(m, terms, t) for w, m, terms, t in points if w != workload])
            rows.append(evaluate(backend, workload, measured, constants[f"{backend}/{device}"], held_out))
    return constants, rows


def evaluate(backend: str, workload: str, measured: dict, fitted: dict, held_out: dict) -> dict:
    times = {m: t for m, (_, t) in measured.items()}
    fastest = min(times.values())
    predicted = {m: predict(fitted, m, terms) for m, (terms, _) in measured.items()}
    predicted_out = {m: predict(held_out, m, terms) for m, (terms, _) in measured.items()}
    choice, choice_out = min(predicted, key=predicted.get), min(predicted_out, key=predicted_out.get)
    return {
        "backend": backend,
        "workload": workload,
        "times": times,
        "predicted": predicted,
        "choice": choice,
        "ratio": times[choice] / fastest,
        "held_out_choice": choice_out,
        "held_out_ratio": times[choice_out] / fastest,
        "ranking_matches": sorted(times, key=times.get) == sorted(predicted, key=predicted.get),
    }


def markdown(rows: list[dict], source: str, device: str) -> str:
    met = sum(r["ratio"] <= TARGET for r in rows)
    met_out = sum(r["held_out_ratio"] <= TARGET for r in rows)
    ranked = sum(r["ranking_matches"] for r in rows)
    begin, end = markers(device)
    lines = [
        begin,
        f'## implementation="auto": calibration on {device.upper()} (generated)',
        f"Produced by `python -m benchmarks.calibrate --write` from {source}: the cost model's constants "
        "fitted per backend to that run's ntkcore measurements (workloads and sweep points), stored in "
        "`ntkcore/calibration.json`. Held out: fitted without the workload's own measurements.",
        "",
        f"auto within {TARGET}× of the fastest measured: **{met} of {len(rows)}** in-sample, {met_out} of "
        f"{len(rows)} held out; predicted ranking of the three implementations equals the measured one on "
        f"**{ranked} of {len(rows)}**.",
        "",
        "| workload | backend | JC ms | NVP ms | SD ms | auto's choice | auto / fastest | held out: choice, ratio | "
        "ranking matches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['times'][m] * 1e3:.3g}" if m in r["times"] else "—" for m in METHODS]
        lines.append(
            f"| {r['workload']} | {r['backend']} | {' | '.join(cells)} | {SHORT[r['choice']]} | "
            f"{r['ratio']:.2f}× | {SHORT[r['held_out_choice']]}, {r['held_out_ratio']:.2f}× | "
            f"{'yes' if r['ranking_matches'] else 'no'} |"
        )
    lines.append(end)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results/bench.json", help="a run of python -m benchmarks")
    parser.add_argument(
        "--update",
        action="append",
        default=[],
        help="a later run (after a change that affects some workloads only): its measurements replace the "
        "run's for the same runner, backend, workload and implementation",
    )
    parser.add_argument("--write", action="store_true", help="store the constants and the RESULTS.md table")
    parser.add_argument("--calibration", default="ntkcore/calibration.json")
    parser.add_argument("--report", default="benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    run = json.loads(Path(args.results).read_text())
    results = run["results"]
    source = f"`{args.results}` ({run['meta']['date']}, {run['meta']['machine']})"
    for path in args.update:
        later = json.loads(Path(path).read_text())
        key = lambda r: (r["runner"], r["backend"], r["workload"], r["implementation"], r.get("sweep"))  # noqa: E731
        replaced = {key(r) for r in later["results"]}
        results = [r for r in results if key(r) not in replaced] + later["results"]
        rows = sorted({f"{r['workload']} ({r['backend']})" for r in later["results"]})
        source += f", with {', '.join(rows)} from `{path}` ({later['meta']['date']})"
    constants, rows = calibrate(collect(results))
    devices = sorted({key.split("/")[1] for key in constants})
    texts = {d: markdown([r for r in rows if f"{r['backend']}/{d}" in constants], source, d) for d in devices}
    print("\n".join(texts.values()))
    if args.write:
        # a run replaces the constants of the device classes it measured, and keeps the others
        path = Path(args.calibration)
        data = json.loads(path.read_text())
        kept = {k: v for k, v in data["constants"].items() if k.split("/")[1] not in devices}
        for device in devices:  # an uncalibrated backend on this class: the mean of the fitted ones
            kept[f"default/{device}"] = _mean([c for k, c in constants.items() if k.endswith(f"/{device}")])
        data["constants"] = {**kept, **constants}
        sources = data.get("source", {})
        sources = sources if isinstance(sources, dict) else {"cpu": sources}  # files written before GPU runs
        for device in devices:
            sources[device] = f"fitted by python -m benchmarks.calibrate to {source}"
        data["source"] = sources
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for device, text in texts.items():
            report.write(Path(args.report), text, *markers(device))
    return 0


def _mean(tables: list[dict]) -> dict:
    """The entry-wise mean of several backends' constants."""
    first = tables[0]
    return {
        key: {m: sum(t[key][m] for t in tables) / len(tables) for m in first[key]}
        if isinstance(first[key], dict)
        else sum(t[key] for t in tables) / len(tables)
        for key in first
    }


if __name__ == "__main__":
    raise SystemExit(main())
