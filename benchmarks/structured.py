"""Structured derivatives against the other implementations, side by side.

Every (backend, workload, implementation) runs in its own subprocess, so that its peak RSS is
its own: median wall time over ``--repeats`` calls after a first (compiling) call, the first
call apart, and the peak RSS above the process's baseline after the model is built. Every
kernel is checked against the workload's Jacobian-contraction kernel of the same backend
before its time is reported.

    python -m benchmarks.structured --out benchmarks/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

IMPLEMENTATIONS = ("jacobian_contraction", "ntk_vector_products", "structured")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(backend: str, workload_name: str, implementation: str, repeats: int, reference: str | None) -> dict:
    """One measurement, in this process."""
    import ntkcore
    from benchmarks.workloads import WORKLOADS, build, inputs
    from ntkcore.demo import time_calls

    workload = WORKLOADS[workload_name]
    model, kwargs = build(backend, workload)
    x = inputs(workload)
    adapter = ntkcore.get_backend(backend)
    kernel_fn = ntkcore.ntk_fn(model, implementation=implementation, **workload.axes, **kwargs)
    baseline = _rss_mb()
    kernel, first, median = time_calls(lambda: adapter.to_numpy(kernel_fn(x)), repeats)
    result = {
        "backend": backend,
        "workload": workload_name,
        "implementation": implementation,
        "first_s": first,
        "median_s": median,
        "peak_rss_mb": _rss_mb() - baseline,
    }
    if reference is not None:
        expected = np.load(reference)
        result["max_rel_diff"] = float(np.max(np.abs(kernel - expected)) / np.max(np.abs(expected)))
    else:
        np.save(os.environ["NTKCORE_BENCH_SAVE"], kernel)
    return result


def run_all(backends: list[str], workloads: list[str], repeats: int, tmp: Path) -> list[dict]:
    results = []
    for workload in workloads:
        for backend in backends:
            reference = tmp / f"{backend}-{workload}.npy"
            for implementation in IMPLEMENTATIONS:  # Jacobian contraction first: the reference
                args = [
                    sys.executable,
                    "-m",
                    "benchmarks.structured",
                    "--one",
                    backend,
                    workload,
                    implementation,
                    "--repeats",
                    str(repeats),
                ]
                env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
                if implementation == "jacobian_contraction":
                    env["NTKCORE_BENCH_SAVE"] = str(reference)
                else:
                    args += ["--reference", str(reference)]
                done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
                if done.returncode != 0:
                    print(f"{backend} {workload} {implementation}: FAILED\n{done.stderr[-1500:]}", file=sys.stderr)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if result.get("max_rel_diff", 0.0) > 1e-4:
                    print(
                        f"{backend} {workload} {implementation}: disagrees ({result['max_rel_diff']:.1e}), "
                        "not reported",
                        file=sys.stderr,
                    )
                    continue
                results.append(result)
                print(
                    f"{backend:10s} {workload:16s} {implementation:22s} median {result['median_s'] * 1e3:9.1f} ms "
                    f"first {result['first_s'] * 1e3:9.1f} ms peak +{result['peak_rss_mb']:8.1f} MB",
                    flush=True,
                )
    return results


def table(results: list[dict]) -> str:
    """Markdown: per workload × backend, each implementation's time and memory, and SD's speed-up."""
    rows = [
        "| workload | backend | JC ms | NVP ms | SD ms | JC / SD | JC MB | SD MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["workload"], r["backend"]) for r in results})
    for workload, backend in keys:
        by = {r["implementation"]: r for r in results if r["workload"] == workload and r["backend"] == backend}

        def ms(name: str, by: dict = by) -> str:
            return f"{by[name]['median_s'] * 1e3:.1f}" if name in by else "—"

        speedup = (
            f"{by['jacobian_contraction']['median_s'] / by['structured']['median_s']:.3g}×"
            if {"jacobian_contraction", "structured"} <= set(by)
            else "—"
        )
        mem = {k: f"{by[k]['peak_rss_mb']:.0f}" if k in by else "—" for k in ("jacobian_contraction", "structured")}
        rows.append(
            f"| {workload} | {backend} | {ms('jacobian_contraction')} | {ms('ntk_vector_products')} | "
            f"{ms('structured')} | {speedup} | {mem['jacobian_contraction']} | {mem['structured']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.workloads import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,jax,tensorflow")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "WORKLOAD", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.repeats, args.reference)))
        return 0
    out = Path(args.out)
    tmp = out.parent / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    results = run_all(args.backends.split(","), args.workloads.split(","), args.repeats, tmp)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
