"""Keras applications' first call: where the time goes and what ntkcore's pfor rules save.

    python -m benchmarks.keras_first_call [--models mobilenet_v2,resnet50] [--implementations ...]

Keras applications built with ``weights=None`` at 32×32×3, 10 classes, float32, N = 4, the full
kernel. Each (model, implementation, rules) runs in a process of its own: the first call
(capture, tracing, pfor's vectorisation, graph optimisation) and the median of two warm calls,
with ntkcore's pfor rules (``backends/ntkcore_tensorflow/pfor_rules.py``) installed as shipped
(``on``) or replaced by a no-op (``off``: TensorFlow's own rules, a while_loop wherever they
have none). The kernel's checksum shows both give the same kernel. Results go
to ``results/keras_first_call.json`` and a generated section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import report
from benchmarks.realistic import in_child, timed

BEGIN = "<!-- begin: written by `python -m benchmarks.keras_first_call`; do not edit by hand -->"
END = "<!-- end: written by `python -m benchmarks.keras_first_call` -->"
N = 4
MODELS = {
    "mobilenet_v2": ("MobileNetV2", {"alpha": 0.35}),
    "mobilenet": ("MobileNet", {"alpha": 0.25}),
    "resnet50": ("ResNet50", {}),
}
IMPLEMENTATIONS = ("jacobian_contraction", "structured", "ntk_vector_products")


def one(name: str, implementation: str, rules: str) -> dict:
    """Time one implementation on one Keras application in this process."""
    import contextlib

    import keras
    import numpy as np
    import tensorflow as tf

    import ntkcore
    from ntkcore_tensorflow import pfor_rules

    if rules == "off":
        pfor_rules.installed = contextlib.nullcontext
    keras.utils.set_random_seed(0)
    cls, options = MODELS[name]
    model = getattr(keras.applications, cls)(input_shape=(32, 32, 3), weights=None, classes=10, **options)
    x = tf.constant(np.random.default_rng(0).standard_normal((N, 32, 32, 3)), tf.float32)
    kernel = []
    figures = timed(lambda: kernel.append(ntkcore.ntk(model, x, implementation=implementation)), 2)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    checksum = float(tf.reduce_sum(tf.abs(kernel[-1])))
    return {"model": name, "implementation": implementation, "rules": rules, "params": params,
            "checksum": checksum, **figures}  # fmt: skip


def _child(name: str, implementation: str, rules: str, timeout: float) -> dict:
    code = (
        "import json; from benchmarks import keras_first_call as k; "
        f"print(json.dumps(k.one({name!r}, {implementation!r}, {rules!r})))"
    )
    return in_child(code, {"model": name, "implementation": implementation, "rules": rules}, timeout)


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        BEGIN,
        "## Keras applications' first call, TensorFlow on CPU (generated)",
        "",
        f"Produced by `{command}`: `weights=None`, 32×32×3, 10 classes, float32, N = {N}, the full kernel; "
        "each row in a process of its own. First: the first call (capture, tracing, vectorisation, graph "
        "optimisation); warm: the median of two later calls; peak: RSS above the level once the model was built. "
        "`off`: TensorFlow's own pfor rules (a while_loop where it has none: a convolution's per-example filter "
        "gradient, a depthwise convolution or its gradients with a shared filter, a convolution with a per-example "
        "filter); `on`: with ntkcore's (patches times gradients, batch folding). Off / on: the speed-ups.",
        "",
        "| model | params | implementation | pfor rules | first s | warm s | peak MB | first off / on "
        "| warm off / on | kernel Σ|K| |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    done = {(r["model"], r["implementation"], r["rules"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['implementation']} | {r['rules']} | failed: {r['error']!r} |||||")
            continue
        off = done.get((r["model"], r["implementation"], "off"))
        compared = r["rules"] == "on" and off and "error" not in off
        first = f"{off['first_s'] / r['first_s']:.2f}×" if compared else ""
        warm = f"{off['seconds'] / r['seconds']:.2f}×" if compared else ""
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['implementation']} | {r['rules']} | {r['first_s']:.3g} | "
            f"{r['seconds']:.3g} | {r['peak_mb']:.0f} | {first} | {warm} | {r['checksum']:.6g} |"
        )
    return "\n".join([*lines, END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.keras_first_call", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--rules", default="off,on")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default="benchmarks/results/keras_first_call.json")
    parser.add_argument("--report", default="benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for implementation in args.implementations.split(","):
            for rules in args.rules.split(","):
                rows.append(_child(name, implementation, rules, args.timeout))
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python -m benchmarks.keras_first_call", *(argv if argv is not None else sys.argv[1:])])
    report.write(Path(args.report), markdown(rows, command), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
