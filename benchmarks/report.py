"""The harness's report: ratio and target tables, every measurement, scaling slopes and plots.

The generated part of RESULTS.md lies between two marker lines; the text around them (the
analysis of misses) is kept when the report is rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from benchmarks.flops import flops
from benchmarks.workloads import ALL
from ntkcore.implementations import AUTO, REGISTRY

BEGIN = "<!-- begin: written by `python -m benchmarks`; do not edit by hand -->"
END = "<!-- end: written by `python -m benchmarks` -->"
SHORT = {**{name: method.label for name, method in REGISTRY.items()}, AUTO: "auto"}
NAMES = {"jax": "JAX", "torch": "PyTorch", "tensorflow": "TensorFlow"}
# Exponent of the dominant term of the cost table (arXiv 2206.08720) in each sweep: width w
# (P and [FP] ∝ w²) at fixed N; N at fixed width (the N² terms).
COST_TABLE = {
    ("width", "jacobian_contraction"): (2, "N·O·[FP] + N²·O·P, both ∝ w²"),
    ("width", "ntk_vector_products"): (2, "N²·O·[FP] ∝ w²"),
    ("width", "structured"): (2, "N·O·[FP] ∝ w²; the structured products ∝ w"),
    ("n", "jacobian_contraction"): (2, "N²·O·P (plus N·O·[FP])"),
    ("n", "ntk_vector_products"): (2, "N²·O·[FP]"),
    ("n", "structured"): (2, "N² structured products (plus N·O·[FP])"),
}
SWEEPS = ("width", "n")  # each sweep varies the result field of its name


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3g}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.3g}×"


def _best(results: list[dict], workload: str, runner: str | None, backend: str | None) -> dict | None:
    rows = [
        r
        for r in results
        if r["workload"] == workload
        and r["sweep"] is None
        and (runner is None or r["runner"] == runner)
        and (backend is None or r["backend"] == backend)
        and (runner is not None or r["runner"] != "ntkcore")
    ]
    return min(rows, key=lambda r: r["median_s"], default=None)


def _time(r: dict | None) -> float | None:
    return None if r is None else r["median_s"]


def _named(r: dict | None) -> str:
    if r is None:
        return "—"
    who = NAMES.get(r["backend"], r["backend"]) if r["runner"] == "ntkcore" else r["runner"]
    return f"{_ms(r['median_s'])} ({who} {SHORT.get(r['implementation'], r['implementation'])})"


def ratio_rows(outcome: dict) -> list[list[str]]:
    results = outcome["results"]
    rows = [
        [
            "workload",
            "ntkcore-JAX best ms",
            "neural-tangents best ms",
            "JAX / nt",
            "ntkcore-PyTorch best ms",
            "torch.func best ms",
            "PyTorch / torch.func",
            "ntkcore-TF best ms",
            "ntkcore best / best anchor",
        ]
    ]
    for workload in _workloads(results):
        jax, nt = _best(results, workload, "ntkcore", "jax"), _best(results, workload, "neural-tangents", None)
        torch, tf = _best(results, workload, "ntkcore", "torch"), _best(results, workload, "ntkcore", "tensorflow")
        func = _best(results, workload, "torch.func", None)
        ours, anchor = _best(results, workload, "ntkcore", None), _best(results, workload, None, None)
        rows.append(
            [
                workload,
                _named(jax),
                _named(nt),
                _ratio(_time(jax), _time(nt)),
                _named(torch),
                _named(func),
                _ratio(_time(torch), _time(func)),
                _named(tf),
                _ratio(_time(ours), _time(anchor)),
            ]
        )
    return rows


def target_rows(outcome: dict) -> tuple[list[list[str]], int, int]:
    """Each target of the benchmark issue on each workload: (rows, met, total)."""
    results = outcome["results"]
    rows = [["target", "workload", "measured", "met"]]

    def add(target: str, workload: str, value: float | None, limit: float) -> None:
        if value is not None:
            rows.append([target, workload, f"{value:.3g}×", "yes" if value <= limit else "**no**"])

    for w in _workloads(results):
        sd = [r for r in results if r["workload"] == w and r["sweep"] is None and r["implementation"] == "structured"]
        ours_sd = next((r for r in sd if r["runner"] == "ntkcore" and r["backend"] == "jax"), None)
        nt_sd = next((r for r in sd if r["runner"] == "neural-tangents"), None)
        if ours_sd and nt_sd:
            add("ntkcore-JAX SD / neural-tangents SD ≤ 1.0", w, ours_sd["median_s"] / nt_sd["median_s"], 1.0)
        ours, anchor = _best(results, w, "ntkcore", None), _best(results, w, None, None)
        if ours and anchor:
            add("ntkcore best / best anchor ≤ 0.8", w, ours["median_s"] / anchor["median_s"], 0.8)
        torch, func = _best(results, w, "ntkcore", "torch"), _best(results, w, "torch.func", None)
        kind = ALL[w].kind
        if torch and func and kind in ("mlp", "factorized", "cnn"):
            limit = 0.1 if kind != "cnn" else 1.0
            add(f"ntkcore-PyTorch best / torch.func best ≤ {limit:g}", w, torch["median_s"] / func["median_s"], limit)
        tf, jax = _best(results, w, "ntkcore", "tensorflow"), _best(results, w, "ntkcore", "jax")
        if tf and jax:
            add("ntkcore-TF best / ntkcore-JAX best ≤ 1.5", w, tf["median_s"] / jax["median_s"], 1.5)
    met = sum(r[3] == "yes" for r in rows[1:])
    return rows, met, len(rows) - 1


def measurement_rows(outcome: dict) -> list[list[str]]:
    rows = [["workload", "runner", "method", "median ms", "first call s", "peak MB", "GFLOP", "% of matmul peak"]]
    order = {"ntkcore": 0, "neural-tangents": 1, "torch.func": 2}
    results = [r for r in outcome["results"] if r["sweep"] is None]
    for r in sorted(results, key=lambda r: (r["workload"], order[r["runner"]], r["backend"], r["implementation"])):
        runner = f"ntkcore-{NAMES[r['backend']]}" if r["runner"] == "ntkcore" else r["runner"]
        gflop = "—" if r.get("flops") is None else f"{r['flops'] / 1e9:.3g}"
        share = "—" if r.get("flops_fraction") is None else f"{100 * r['flops_fraction']:.2g}"
        rows.append(
            [
                r["workload"],
                runner,
                SHORT[r["implementation"]],
                _ms(r["median_s"]),
                f"{r['first_s']:.2f}",
                f"{r['peak_mb']:.0f}",
                gflop,
                share,
            ]
        )
    return rows


def _workloads(results: list[dict]) -> list[str]:
    return sorted({r["workload"] for r in results if r["sweep"] is None})


def _points(outcome: dict, sweep: str, backend: str, implementation: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Sizes, median times and workload names of a sweep's points, by size."""
    rows = [
        r
        for r in outcome["results"]
        if r["sweep"] == sweep and r["backend"] == backend and r["implementation"] == implementation
    ]
    rows.sort(key=lambda r: r[sweep])
    sizes, times = np.array([r[sweep] for r in rows], float), np.array([r["median_s"] for r in rows])
    return sizes, times, [r["workload"] for r in rows]


def _slope(x: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0]) if len(x) >= 3 else None


def slope_rows(outcome: dict) -> list[list[str]]:
    rows = [["sweep", "backend", "method", "points", "measured slope", "analytic-FLOP slope", "cost table"]]
    backends = sorted({r["backend"] for r in outcome["results"] if r["sweep"]})
    for sweep in SWEEPS:
        for backend in backends:
            for implementation in REGISTRY:
                x, t, names = _points(outcome, sweep, backend, implementation)
                if not len(x):
                    continue
                analytic = np.array([flops(ALL[name], implementation) for name in names])
                measured, predicted = _slope(x, t), _slope(x, analytic)
                exponent, why = COST_TABLE[(sweep, implementation)]
                rows.append(
                    [
                        f"{sweep} {int(x[0])}–{int(x[-1])}",
                        NAMES[backend],
                        SHORT[implementation],
                        str(len(x)),
                        "—" if measured is None else f"{measured:.2f}",
                        "—" if predicted is None else f"{predicted:.2f}",
                        f"{exponent} ({why})",
                    ]
                )
    return rows


def plots(outcome: dict, out: Path) -> list[Path]:
    """Log-log time against width and against N, one panel per backend; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    backends = sorted({r["backend"] for r in outcome["results"] if r["sweep"]})
    for sweep in SWEEPS:
        if not any(r["sweep"] == sweep for r in outcome["results"]):
            continue
        fig, axes = plt.subplots(1, len(backends), figsize=(4.2 * len(backends), 3.6), squeeze=False, sharey=True)
        for ax, backend in zip(axes[0], backends):
            for implementation in REGISTRY:
                x, t, _ = _points(outcome, sweep, backend, implementation)
                if len(x):
                    slope = _slope(x, t)
                    label = SHORT[implementation] + ("" if slope is None else f" (slope {slope:.2f})")
                    ax.loglog(x, t, "o-", label=label, base=2)
            ax.set_title(f"ntkcore-{NAMES[backend]}")
            ax.set_xlabel("hidden width" if sweep == "width" else "N (examples)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("median seconds per kernel")
        first = ALL[next(r["workload"] for r in outcome["results"] if r["sweep"] == sweep)]
        d, o = first.widths[0], first.widths[-1]
        what = f"MLP {d}→w→w→{o}, N = {first.n}" if sweep == "width" else "MLP " + "→".join(map(str, first.widths))
        what += ", traced NTK" if first.traced else ""
        fig.suptitle(f"Time versus {sweep} ({what})", fontsize=10)
        fig.tight_layout()
        path = out / f"scaling_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def markdown(outcome: dict, plot_paths: list[Path], relative_to: Path) -> str:
    meta = outcome["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    anchor = ", ".join(f"{k} {v}" for k, v in meta["anchor_versions"].items()) or "not run"
    settings = ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items())
    matmul = ", ".join(f"{m['backend']} {m['flops_per_s'] / 1e9:.0f}" for m in meta["matmul"])
    targets, met, total = target_rows(outcome)
    parts = [
        BEGIN,
        "## ntkcore against the anchors (generated)",
        f"Produced by `{meta['command']}` on {meta['date']}: {meta['machine']}; devices: "
        f"{', '.join(meta['devices'])}. Frameworks: {versions}. neural-tangents environment: {anchor}. "
        f"Framework settings: {settings or 'the defaults'}.",
        f"Float32 matmul throughput measured in the same run (GFLOP/s, 2048², best of {meta['repeats']}): "
        f"{matmul}; the highest, {meta['peak_flops'] / 1e9:.0f} GFLOP/s, is the peak that "
        "“% of matmul peak” refers to.",
        f"Every time is the median of {meta['repeats']} calls after a first (compiling) call, in a process of "
        "its own; “first call” is that first call. Peak MB is the growth of peak RSS over the level after "
        "building the model (on a GPU: the allocator's peak). Before any time is reported, the kernel is "
        f"checked against {meta['reference']}: max |K − K_ref| ≤ {meta['tolerance']:g}·max |K_ref|, "
        "else the method is listed as rejected. neural-tangents' traced kernels (a mean over the traced "
        "axis) are multiplied by O to compare with the sum ntkcore and torch.func take.",
        "### Ratios (lower is better)",
        "Each cell: median ms (fastest runner and method). JAX / nt = ntkcore-JAX best over neural-tangents "
        "best; PyTorch / torch.func = ntkcore-PyTorch best over the plain torch.func baseline's best; "
        "the last column: ntkcore's best on any backend over the best anchor of any library.",
        _table(ratio_rows(outcome)),
        f"### Targets: {met} of {total} met",
        _table(targets),
        "### Every measurement",
        "GFLOP: the analytic FLOPs of the method (benchmarks/flops.py: the cost table term by term); "
        "% of matmul peak: those FLOPs per second over the measured peak.",
        _table(measurement_rows(outcome)),
    ]
    for title, items, fields in (
        ("Rejected (kernel disagrees with the reference)", outcome["rejected"], ("workload", "max_rel_diff")),
        ("Failed", outcome["failed"], ("workloads", "error")),
        ("Skipped sweep points", outcome["skipped"], ("workload", "reason")),
    ):
        if items:
            parts.append(f"### {title}")
            parts.append(
                "\n".join(
                    f"- {describe(i)}: " + "; ".join(f"{k} {i.get(k)}" for k in fields if i.get(k) is not None)
                    for i in items
                )
            )
    slopes = slope_rows(outcome)
    if len(slopes) > 1:
        parts.append("### Scaling")
        parts.append(
            f"Median of {meta['scaling_repeats']} calls per point; slopes are least-squares fits of log time "
            "against log size over the points that ran; the analytic-FLOP slope fits benchmarks/flops.py's "
            "counts over the same points; the cost-table exponent is that of the dominant term."
        )
        parts += [f"![{p.stem}]({Path(os.path.relpath(p, relative_to)).as_posix()})" for p in plot_paths]
        parts.append(_table(slopes))
    parts.append(END)
    return "\n\n".join(parts) + "\n"


def describe(item: dict) -> str:
    """``ntkcore-jax SD``, ``neural-tangents JC``: a runner and its method, for logs and lists."""
    who = f"ntkcore-{item['backend']}" if item["runner"] == "ntkcore" else item["runner"]
    return f"{who} {SHORT.get(item.get('implementation'), item.get('implementation'))}"


def write(path: Path, generated: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the generated part of ``path`` between ``begin`` and ``end`` (or append one),
    keeping the hand-written text."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + generated
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
