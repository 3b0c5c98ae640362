"""The sketched NTK: error against time, beside the exact kernel's time (torch, CPU).

    python -m benchmarks.sketch [--models bert,resnet18] [--ks 64,256,1024]

The realistic-width workloads of ``benchmarks.realistic`` (a BERT-like transformer, 1.9 M
parameters, its [CLS] state traced; a CIFAR ResNet-18, 11.2 M parameters, 10 logits), float32,
N = 8. Per model, in one process: the exact kernel by ``auto`` (the reference, and its time),
then for each k the plain sketch (k jvps of the batch) and the Kronecker-structured one (per
layer, after the structured derivatives' N·O backward passes), each timed warm (the second call)
with its relative error ‖Θ̂ − Θ‖_F / ‖Θ‖_F and the norm of its estimated standard error over the
same. Results go to ``results/sketch.json`` and a generated section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.realistic import N, build

BEGIN = "<!-- begin: written by `python -m benchmarks.sketch`; do not edit by hand -->"
END = "<!-- end: written by `python -m benchmarks.sketch` -->"
KINDS = {"plain": False, "kronecker": True}
WARM_K = 8  # the untimed call that compiles a kind's projection


def _timed(fn, warm: bool = False):
    """(result, seconds) of one call; unless ``warm``, after an untimed first call (capture and
    compilation)."""
    if not warm:
        fn()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(name: str, ks: list[int], kinds: list[str]) -> list[dict]:
    import torch

    import ntkcore

    torch.backends.cuda.matmul.allow_tf32 = False
    model, x, options = build(name)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact, seconds = _timed(lambda: ntkcore.ntk(model, x, **options))
        choice = ntkcore.explain(model, x, **options).choice
        exact = exact.double().numpy()
        params = sum(int(p.numel()) for p in model.parameters() if p.requires_grad)
        rows.append({"model": name, "params": params, "method": f"exact ({choice})", "seconds": seconds})
        for kind in kinds:
            # the projection (and the Kronecker pieces) compile once per call setting, whatever k:
            # one untimed call at a small k, then each k timed once
            ntkcore.sketched_ntk(model, x, sketch_dim=WARM_K, seed=1, sketch_kronecker=KINDS[kind], **options)
            for k in ks:
                sketch = {"sketch_dim": k, "seed": 0, "sketch_kronecker": KINDS[kind]}
                call = lambda s=sketch: ntkcore.sketched_ntk(model, x, **s, **options)  # noqa: E731
                (estimate, error), seconds = _timed(call, warm=True)
                estimate, error = estimate.double().numpy(), error.double().numpy()
                norm = np.linalg.norm(exact)
                rows.append({
                    "model": name, "params": params, "method": f"sketch {kind}", "k": k, "seconds": seconds,
                    "error": float(np.linalg.norm(estimate - exact) / norm),
                    "estimated": float(np.linalg.norm(error) / norm),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    commands = "`, then `".join(dict.fromkeys(r["command"] for r in rows))
    lines = [
        BEGIN,
        "## The sketched NTK: error against time, torch on CPU (generated)",
        "",
        f"Produced by `{commands}`: float32, N = {N}; warm times: the exact kernel's second call, a sketch "
        f"row's one call once an untimed call at k = {WARM_K} has compiled its kind (the runs before that rule "
        "timed the second call at each k: the same quantity). Error: ‖Θ̂ − Θ‖_F / ‖Θ‖_F "
        "against the exact kernel; estimated: the norm of the standard error `sketched_ntk` reports, "
        "over ‖Θ‖_F. Time ratio: over the exact kernel's, measured in the same run (its row above).",
        "",
        "| model | params | method | k | seconds | / exact | error | estimated error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    exact = {(r["model"], r["command"]): r["seconds"] for r in rows if r["method"].startswith("exact")}
    for r in rows:
        k = r.get("k", "")
        error = f"{r['error']:.3g}" if "error" in r else ""
        estimated = f"{r['estimated']:.3g}" if "estimated" in r else ""
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['method']} | {k} | {r['seconds']:.3g} | "
            f"{r['seconds'] / exact[r['model'], r['command']]:.2f} | {error} | {estimated} |"
        )
    return "\n".join([*lines, END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sketch", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert,resnet18")
    parser.add_argument("--ks", default="64,256,1024")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", default="benchmarks/results/sketch.json")
    parser.add_argument("--report", default="benchmarks/RESULTS.md")
    parser.add_argument("--update", action="store_true", help="keep the rows of other runs in --out")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    command = " ".join(["python -m benchmarks.sketch", *(argv if argv is not None else sys.argv[1:])])
    kinds = args.kinds.split(",")
    rows = [{**row, "command": command} for name in args.models.split(",") for row in run(name, ks, kinds)]
    if args.update and Path(args.out).exists():
        rows = [r for r in json.loads(Path(args.out).read_text()) if r["command"] != command] + rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    report.write(Path(args.report), markdown(rows), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
