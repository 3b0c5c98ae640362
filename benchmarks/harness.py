"""The benchmark harness: ntkcore against neural-tangents and torch.func, side by side in one run.

    python -m benchmarks [--anchor-python PATH] [--workloads ...] [--backends ...] [--smoke]

Steps, all in this one run: save every workload's weights and inputs (.npz); measure this
machine's float32 matmul throughput in every framework; compute ntkcore's float64 kernel of
every workload (the reference); time every runner (ntkcore backend × implementation, the
torch.func baselines, neural-tangents' four implementations in its own environment) in its
own process; refuse any kernel that disagrees with the reference; run the width and N
sweeps; write results/bench.json, the scaling plots and the report into RESULTS.md.
``nox -s bench`` builds the neural-tangents environment and runs this.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.child import kernel_file
from benchmarks.flops import flops, jacobian_bytes
from benchmarks.report import describe
from benchmarks.workloads import ALL, N_SWEEP, SMOKE, SMOKE_N, SMOKE_WIDTH, WIDTH_SWEEP, WORKLOADS, save
from ntkcore.implementations import AUTO, REGISTRY
from ntkcore.registry import BUILTIN

IMPLEMENTATIONS = tuple(REGISTRY)
BACKENDS = tuple(BUILTIN)
TORCH_FUNC = tuple(i for i in IMPLEMENTATIONS if not REGISTRY[i].uses_capture)  # what the torch.func baseline has
# environment variables that change the frameworks' kernels; the report names those set
PERFORMANCE_SETTINGS = ("TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# A float32 kernel agrees with the float64 reference when max|K − K_ref| ≤ TOLERANCE · max|K_ref|.
# float32 rounding (ε ≈ 6e-8) accumulated over sums of up to P ≈ 4e6 terms gives √P·ε ≈ 1.2e-4
# at worst for random-walk errors; 1e-3 leaves margin for that while a real error (a missing
# layer, a mean taken for a trace, a wrong transpose) shows at 1e-2 or more.
TOLERANCE = 1e-3


def installed(backends: list[str]) -> list[str]:
    return [b for b in backends if importlib.util.find_spec(BUILTIN[b][0]) is not None]


class Harness:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tmp = Path(args.out_dir) / "tmp"
        self.data, self.kernels = self.tmp / "data", self.tmp / "kernels"
        self.kernels.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.rejected: list[dict] = []
        self.failed: list[dict] = []
        self.skipped: list[dict] = []

    def child(self, spec: dict, python: str = sys.executable) -> list[dict]:
        """Run one child process; its JSON lines, or [] (recorded as a failure)."""
        spec = {"data": str(self.data), "save": str(self.kernels), "repeats": self.args.repeats, **spec}
        # The repository first; the caller's own PYTHONPATH is kept for ntkcore's children but
        # not for the neural-tangents environment, whose pinned jax must not be shadowed.
        paths = [str(Path(__file__).parent.parent)]
        if python == sys.executable and os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": os.pathsep.join(paths)}
        try:
            done = subprocess.run(
                [python, "-m", "benchmarks.child", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
                timeout=self.args.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self.failed.append({**_key(spec), "error": f"timed out after {self.args.timeout} s"})
            print(f"  {describe(spec)}: timed out", flush=True)
            return []
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0:
            error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            self.failed.append({**_key(spec), "workloads": spec.get("workloads"), "error": error})
            print(f"  {describe(spec)}: FAILED: {error}", flush=True)
        return lines

    def check(self, result: dict, sweep: str | None = None) -> None:
        """Accept ``result`` only if its kernel agrees with the float64 reference."""
        name = result["workload"]
        kernel = np.load(self.kernels / kernel_file(result, name))
        reference = {"runner": "reference", "backend": self.reference_backend, "implementation": "structured"}
        expected = np.load(self.kernels / kernel_file(reference, name))
        if kernel.shape != expected.shape:
            diff = float("inf")
        else:
            diff = float(np.max(np.abs(kernel - expected)) / np.max(np.abs(expected)))
        workload = ALL[name]
        result.update(max_rel_diff=diff, flops=flops(workload, result["implementation"]), n=workload.n, sweep=sweep)
        if workload.widths:
            result["width"] = workload.widths[1]
        if result["flops"] is not None:
            result["flops_fraction"] = result["flops"] / result["median_s"] / self.peak_flops
        if diff <= TOLERANCE:
            self.results.append(result)
            status = ""
        else:
            self.rejected.append(result)
            status = f"  REJECTED: differs from the float64 reference by {diff:.1e}"
        print(
            f"  {describe(result):48s} {name:18s} median {result['median_s'] * 1e3:10.1f} ms  "
            f"first {result['first_s']:7.2f} s  peak {result['peak_mb']:8.0f} MB{status}",
            flush=True,
        )

    def runners(self) -> list[dict]:
        specs = [
            {"runner": "ntkcore", "backend": b, "implementation": i} for b in self.backends for i in IMPLEMENTATIONS
        ]
        if "torch" in self.backends and not self.args.no_anchors:
            specs += [{"runner": "torch.func", "backend": "torch", "implementation": i} for i in TORCH_FUNC]
        return specs

    def run(self) -> dict:
        args = self.args
        workloads = [SMOKE.name] if args.smoke else args.workloads.split(",")
        unknown = [w for w in workloads if w not in ALL]
        if unknown:
            raise SystemExit(f"--workloads: unknown {unknown}; expected some of {sorted(WORKLOADS)}")
        self.backends = installed(args.backends.split(","))
        if not self.backends:
            raise SystemExit(f"--backends: none of {args.backends} is installed")
        sweeps = {} if args.no_scaling else {"width": WIDTH_SWEEP, "n": N_SWEEP}
        if args.smoke and not args.no_scaling:
            sweeps = {"width": SMOKE_WIDTH, "n": SMOKE_N}
        every = workloads + [w.name for sweep in sweeps.values() for w in sweep]
        for name in every:
            save(ALL[name], self.data)

        print("float32 matmul throughput", flush=True)
        matmul = [r for b in ("numpy", *self.backends) for r in self.child({"runner": "matmul", "backend": b})]
        for r in matmul:
            print(f"  {r['backend']:10s} {r['flops_per_s'] / 1e9:8.1f} GFLOP/s on {r['device']}", flush=True)
        self.peak_flops = max(r["flops_per_s"] for r in matmul)

        self.reference_backend = "jax" if "jax" in self.backends else self.backends[0]
        print(f"float64 reference (ntkcore-{self.reference_backend}, structured)", flush=True)
        reference = {"runner": "reference", "backend": self.reference_backend, "implementation": "structured"}
        if len(self.child({**reference, "workloads": every, "repeats": 0})) != len(every):
            raise SystemExit("the float64 reference failed; nothing can be checked against it")

        anchor = args.anchor_python and not args.no_anchors
        for name in workloads:
            print(name, flush=True)
            specs = self.runners()
            if anchor:
                specs += [
                    {"runner": "neural-tangents", "backend": "jax", "implementation": i}
                    for i in (*IMPLEMENTATIONS, AUTO)
                ]
            for spec in specs:
                python = args.anchor_python if spec["runner"] == "neural-tangents" else sys.executable
                for result in self.child({**spec, "workloads": [name]}, python):
                    self.check(result)

        for sweep, points in sweeps.items():
            print(f"scaling: {sweep}", flush=True)
            for backend in self.backends:
                for implementation in IMPLEMENTATIONS:
                    spec = {"runner": "ntkcore", "backend": backend, "implementation": implementation}
                    names = []
                    for w in points:
                        need = jacobian_bytes(w)
                        if implementation == "jacobian_contraction" and need > args.jacobian_limit_gb * 2**30:
                            reason = f"its Jacobian needs {need / 2**30:.1f} GiB"
                            self.skipped.append({**spec, "sweep": sweep, "workload": w.name, "reason": reason})
                        else:
                            names.append(w.name)
                    done = self.child(
                        {**spec, "workloads": names, "repeats": args.scaling_repeats, "budget_s": args.budget_s}
                    )
                    for result in done:
                        self.check(result, sweep)
                    for name in names[len(done) :]:
                        reason = f"the previous point took over {args.budget_s:g} s"
                        self.skipped.append({**spec, "sweep": sweep, "workload": name, "reason": reason})

        return {
            "meta": self.meta(matmul),
            "results": self.results,
            "rejected": self.rejected,
            "failed": self.failed,
            "skipped": self.skipped,
        }

    def meta(self, matmul: list[dict]) -> dict:
        argv = sys.argv[1:]
        versions = {}
        for package in ("numpy", "jax", "jaxlib", "torch", "tensorflow", "keras"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        anchor = {}
        if self.args.anchor_python and not self.args.no_anchors:
            code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('neural-tangents', 'jax', 'jaxlib', 'numpy')}))"  # noqa: E501
            done = subprocess.run([self.args.anchor_python, "-c", code], capture_output=True, text=True, check=False)
            anchor = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}
        return {
            "command": os.environ.get("NTKCORE_BENCH_COMMAND") or shlex.join(["python", "-m", "benchmarks", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
            "devices": sorted({r["device"] for r in [*self.results, *matmul]}),
            "versions": versions,
            "settings": {k: os.environ[k] for k in PERFORMANCE_SETTINGS if k in os.environ},
            "anchor_versions": anchor,
            "matmul": matmul,
            "peak_flops": self.peak_flops,
            "repeats": self.args.repeats,
            "scaling_repeats": self.args.scaling_repeats,
            "tolerance": TOLERANCE,
            "reference": f"ntkcore-{self.reference_backend} structured derivatives, float64",
        }


def _key(spec: dict) -> dict:
    return {k: spec.get(k) for k in ("runner", "backend", "implementation")}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: the table's)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated; uninstalled ones are left out")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first (default 5)")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="timed calls per sweep point (default 3)")
    parser.add_argument("--anchor-python", help="python of the neural-tangents 0.6.5 environment (nox -s bench)")
    parser.add_argument("--no-anchors", action="store_true", help="ntkcore only: no neural-tangents, no torch.func")
    parser.add_argument("--no-scaling", action="store_true", help="skip the width and N sweeps")
    parser.add_argument("--budget-s", type=float, default=10.0, help="stop a sweep after a point slower than this")
    parser.add_argument("--jacobian-limit-gb", type=float, default=6.0, help="JC sweep points: Jacobian limit")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before a child process is stopped")
    parser.add_argument("--smoke", action="store_true", help="a tiny workload and sweeps: checks the harness")
    parser.add_argument("--out-dir", default="benchmarks/results", help="JSON, plots and scratch files")
    parser.add_argument("--report", default="benchmarks/RESULTS.md", help="markdown report (its generated part)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    outcome = Harness(args).run()
    out = Path(args.out_dir)
    (out / "bench.json").write_text(json.dumps(outcome, indent=1) + "\n")
    plots = report.plots(outcome, out)
    report.write(Path(args.report), report.markdown(outcome, plots, Path(args.report).parent))
    print("wrote", ", ".join(map(str, [out / "bench.json", *plots, args.report])))
    return 1 if outcome["failed"] and args.smoke else 0
