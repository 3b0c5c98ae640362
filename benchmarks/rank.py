"""NTK time against the rank of a factorized layer, at fixed width, on every installed backend.

    python -m benchmarks.rank [--ranks 32,64,...] [--out benchmarks/results/rank.json] [--report benchmarks/RESULTS.md]

The model is the MLP 64 → 2048 → 2048 → 10 (ReLU) of the benchmark's mlp2048 workloads; its
2048 × 2048 hidden layer is replaced by ``ntkcore.factorize`` at each rank (U and V trained,
SVD initialised), and the traced NTK of N = 64 examples by structured derivatives is timed:
median of 3 calls after one that compiles, next to the cost model's FLOPs. The dense rule's
cost per factor is linear in its widths, so the layer's cost falls with the rank (r·(in + out)
against in·out); the dense model is the reference. Results go to a JSON file and to
the RESULTS.md section between this script's markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

import ntkcore
from benchmarks import report
from benchmarks.child import _to_framework
from benchmarks.workloads import TRACED, Workload, build, inputs, weights

WORKLOAD = Workload("rank_mlp2048", "mlp", 64, (64, 2048, 2048, 10), axes=TRACED)
BEGIN = "<!-- begin: written by `python -m benchmarks.rank`; do not edit by hand -->"
END = "<!-- end: written by `python -m benchmarks.rank` -->"


def _time(fn, x, backend: str, repeats: int = 3) -> float:
    to_numpy = ntkcore.get_backend(backend).to_numpy
    to_numpy(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        to_numpy(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep(backend: str, ranks: list[int]) -> list[dict]:
    model, kwargs = build(backend, WORKLOAD, weights(WORKLOAD))
    x = _to_framework(backend, inputs(WORKLOAD))
    dense = ntkcore.get_backend(backend).dense_layers(model, kwargs.get("params"))
    layer = [name for name, (w, _) in dense.items() if w.shape == (2048, 2048)]  # the hidden layer
    rows = []
    for rank in [None, *ranks]:
        if rank is None:
            m, kw = model, kwargs
        else:
            out = ntkcore.factorize(model, rank, layers=layer, params=kwargs.get("params"))
            m, kw = (out[0], {**kwargs, "params": out[1]}) if isinstance(out, tuple) else (out, kwargs)
        prepared = ntkcore.get_backend(backend).prepare(m, kw.get("params"))
        row = {"backend": backend, "rank": rank, "params": sum(int(np.prod(p.shape)) for p in prepared.params.values())}
        row["seconds"] = _time(ntkcore.ntk_fn(m, implementation="structured", **WORKLOAD.axes, **kw), x, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["gflop"] = ntkcore.explain(m, x, **WORKLOAD.axes, **kw).estimates["structured"].flops / 1e9
        print(row, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        BEGIN,
        "## NTK time against the rank of a factorized layer (generated)",
        f"`{command}`: the MLP 64 → 2048 → 2048 → 10 (N = 64, traced NTK), its 2048 × 2048 layer "
        "replaced by `ntkcore.factorize` at each rank (U and V trained); structured derivatives, median of 3 "
        "after a warm-up call, one run, side by side. Ratios are to the dense model in the same backend.",
        "",
        "| backend | rank | parameters | predicted GFLOP | SD ms | SD / dense |",
        "|---|---|---|---|---|---|",
    ]
    dense = {r["backend"]: r for r in rows if r["rank"] is None}
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['rank'] or 'dense'} | {r['params']} | {r['gflop']:.3g} | "
            f"{r['seconds'] * 1e3:.1f} | {r['seconds'] / dense[r['backend']]['seconds']:.2f} |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rank", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="16,64,256,1024,2048", help="comma-separated ranks (2048: full)")
    parser.add_argument("--backends", default=",".join(ntkcore.installed_backends()))
    parser.add_argument("--out", default="benchmarks/results/rank.json")
    parser.add_argument("--report", default="benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = [row for backend in args.backends.split(",") for row in sweep(backend, ranks)]
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    command = "python -m benchmarks.rank" + (f" --ranks {args.ranks}" if argv else "")
    text = markdown(rows, command)
    print(text)
    report.write(Path(args.report), text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
