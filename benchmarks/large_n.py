"""Large-N benchmark: the traced NTK of an MLP written to a zarr store, N from 1,024 upwards.

    python -m benchmarks.large_n [--sizes 1024,4096,16384,65536] [--backends ...] [--dask-n 16384]

Each point runs in a process of its own: ``ntkcore.ntk(mlp, x, trace_axes=(-1,),
batch_size=B, out=<tmp>/kernel.zarr)`` on N random inputs, with the wall time, the number
of tiles, entries per second and the process's peak RSS (which must stay flat: a few tiles
whatever N). Then the same job at ``--dask-n`` on a ``LocalCluster`` of 2 worker processes
(peak RSS of the driver and of the workers). Results go to ``benchmarks/results/large_n.json``
and to a generated section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.workloads import Workload, build, weights

BEGIN = "<!-- begin: written by `python -m benchmarks.large_n`; do not edit by hand -->"
END = "<!-- end: written by `python -m benchmarks.large_n` -->"
WIDTHS = (64, 512, 512, 10)
TILE = 1024


def _model(backend: str) -> tuple:
    workload = Workload("large_n", "mlp", 1, WIDTHS, axes={"trace_axes": (-1,)})
    return build(backend, workload, weights(workload))


def point(backend: str, n: int, out: str, scheduler: str | None) -> dict:
    """One job in this process; returns its measurements."""
    import ntkcore

    model, kwargs = _model(backend)
    x = np.random.default_rng(n).normal(size=(n, WIDTHS[0])).astype(np.float32)
    start = time.perf_counter()
    kernel = ntkcore.ntk(
        model, x, trace_axes=(-1,), batch_size=TILE, out=out, executor=scheduler, progress=False, **kwargs
    )
    seconds = time.perf_counter() - start
    tiles = -(-n // TILE)
    return {
        "backend": backend,
        "n": n,
        "tile": TILE,
        "tiles": tiles * (tiles + 1) // 2,
        "seconds": seconds,
        "entries_per_s": n * n / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finite": bool(np.isfinite(np.asarray(kernel[:8, :8])).all()),
        "scheduler": scheduler is not None,
    }


def _dask_point(backend: str, n: int, out: str) -> dict:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        result = point(backend, n, out, cluster.scheduler_address)
        workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result["worker_peak_rss_mb"] = max(workers.values())
    return result


def _child(backend: str, n: int, dask: bool, timeout: float) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="ntkcore-large-n-"))
    try:
        runner = "b._dask_point" if dask else "lambda *a: b.point(*a, None)"
        target = str(scratch / "k.zarr")
        code = (
            "import json; from benchmarks import large_n as b; "
            f"print(json.dumps(({runner})({backend!r}, {n}, {target!r})))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            return {"backend": backend, "n": n, "error": done.stderr[-800:]}
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"backend": backend, "n": n, "error": f"stopped after {timeout:.0f} s"}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        BEGIN,
        "## Large N: tiles written to zarr (generated)",
        "",
        f"Produced by `{command}`: the traced NTK of an MLP {'→'.join(map(str, WIDTHS))} on N random inputs, "
        f"tiles of {TILE}, `out=` a zarr store; each point in a process of its own. Peak RSS is the "
        "process's; it must stay flat as N grows (a few tiles in memory), and time must grow as the "
        "number of tiles.",
        "",
        "| backend | N | executor | tiles | time s | entries/s | peak RSS MB | s per tile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['n']} | — | — | failed: {r['error'][-120:]!r} | | | |")
            continue
        executor = "Dask, 2 workers" if r["scheduler"] else "local"
        rss = f"{r['peak_rss_mb']:.0f}" + (
            f" (workers {r['worker_peak_rss_mb']:.0f})" if "worker_peak_rss_mb" in r else ""
        )
        lines.append(
            f"| {r['backend']} | {r['n']} | {executor} | {r['tiles']} | {r['seconds']:.1f} | "
            f"{r['entries_per_s']:.3g} | {rss} | {r['seconds'] / r['tiles']:.2f} |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_n", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,4096,16384,65536")
    parser.add_argument("--backends", default="jax,torch,tensorflow")
    parser.add_argument("--dask-n", type=int, default=16384, help="N of the LocalCluster run (0: none)")
    parser.add_argument("--dask-backend", default="torch")
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--out", default="benchmarks/results/large_n.json")
    parser.add_argument("--report", default="benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    rows = []
    for backend in args.backends.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(_child(backend, n, False, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    if args.dask_n:
        rows.append(_child(args.dask_backend, args.dask_n, True, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python -m benchmarks.large_n", *(argv if argv is not None else sys.argv[1:])])
    report.write(Path(args.report), markdown(rows, command), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
