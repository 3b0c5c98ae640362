"""Realistic-width models, as users build them (torch): every implementation and auto, side by side.

    python -m benchmarks.realistic [--models bert,gpt2,lstm,resnet18] [--repeats 2]

BERT-like (hidden 256, 2 layers, 32 tokens; the [CLS] state, traced), GPT-2-like (n_embd 256,
2 layers, vocabulary 1000; the last token's logits traced over the vocabulary), an LSTM text
classifier (embedding 128, LSTM 256, 2 classes) and a CIFAR ResNet-18 at 32×32 (eval-mode
BatchNorm, 10 classes), from transformers configs and torch modules with random weights,
float32. Each (model, implementation) runs in a process of its own, so that a peak or an
out-of-memory kill is its own: the first call's time (capture and tracing included), the
median of ``repeats`` later calls, and the peak RSS above the level once the model was built.
Results go to ``results/realistic.json`` and a generated section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report

BEGIN = "<!-- begin: written by `python -m benchmarks.realistic`; do not edit by hand -->"
END = "<!-- end: written by `python -m benchmarks.realistic` -->"
MODELS = ("bert", "gpt2", "lstm", "resnet18")
N, TOKENS, VOCABULARY = 8, 32, 1000


def _resnet18(nn: Any) -> Any:
    """The CIFAR ResNet-18: a 3×3 stem, four stages of two basic blocks (64 to 512 channels)."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = nn.Sequential()
            if stride != 1 or cin != cout:
                self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            h = self.bn2(self.conv2(nn.functional.relu(self.bn1(self.conv1(x)))))
            return nn.functional.relu(h + self.skip(x))

    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def build(name: str) -> tuple[Any, Any, dict]:
    """(model, inputs, ntk options) of a workload, float32, in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    ids = torch.randint(1, VOCABULARY, (N, TOKENS))
    if name == "bert":
        import transformers as hf

        config = hf.BertConfig(
            vocab_size=VOCABULARY, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=1024, max_position_embeddings=64,
        )  # fmt: skip
        model, x = hf.BertModel(config), ids
        options = {"output": lambda out: out.last_hidden_state[:, 0], "trace_axes": (-1,)}
    elif name == "gpt2":
        import transformers as hf

        config = hf.GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=VOCABULARY, n_positions=64)
        model, x = hf.GPT2LMHeadModel(config), ids
        options = {"output": lambda out: out.logits[:, -1], "trace_axes": (-1,)}
    elif name == "lstm":

        class Classifier(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = nn.Embedding(VOCABULARY, 128)
                self.lstm = nn.LSTM(128, 256, batch_first=True)
                self.head = nn.Linear(256, 2)

            def forward(self, ids: Any) -> Any:
                out, _ = self.lstm(self.embed(ids))
                return self.head(out[:, -1])

        model, x, options = Classifier(), ids, {}
    elif name == "resnet18":
        model, x, options = _resnet18(nn), torch.randn(N, 3, 32, 32), {}
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if hasattr(model, "config"):
        model.config._attn_implementation = "eager"
    return model.eval(), x, options


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(call: Any, repeats: int) -> dict:
    """The first call's seconds, the median of ``repeats`` later calls (the first call's with
    none) and the peak RSS above the level before them (warnings silenced)."""
    import warnings

    base = _rss_mb()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return {"first_s": first, "seconds": statistics.median(times or [first]), "peak_mb": _rss_mb() - base}


def one(name: str, implementation: str, repeats: int) -> dict:
    """Time one implementation on one model in this process."""
    import torch

    import ntkcore

    torch.backends.cuda.matmul.allow_tf32 = False
    model, x, options = build(name)
    explanation = ntkcore.explain(model, x, **options)
    params = sum(layer.params for layer in explanation.layers)
    covered = sum(layer.params for layer in explanation.layers if not layer.rule.startswith("exact"))
    figures = timed(lambda: ntkcore.ntk(model, x, implementation=implementation, **options), repeats)
    return {
        "model": name,
        "implementation": implementation,
        **figures,
        "auto_choice": explanation.choice,
        "params": sum(int(p.numel()) for p in model.parameters()),
        "structured_share": covered / max(params, 1),
    }


def in_child(code: str, row: dict, timeout: float) -> dict:
    """The JSON row the Python ``code`` prints last, run in a process of its own (a peak or an
    out-of-memory kill is its own); ``row`` with an ``error`` when it fails or runs too long,
    updated by any JSON row the code printed before that."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as stopped:
        return {**row, **_last_row(stopped.stdout), "error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "Error: " in line] or done.stderr.splitlines()[-1:]
        why = "killed (out of memory?)" if done.returncode < 0 else errors[-1].split(". ")[0][:240]
        return {**row, **_last_row(done.stdout), "error": why}
    return _last_row(done.stdout)


def _last_row(stdout: str | bytes | None) -> dict:
    """The last JSON object printed (a timed-out child's output comes back as bytes)."""
    text = stdout.decode() if isinstance(stdout, bytes) else stdout or ""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _child(name: str, implementation: str, repeats: int, timeout: float) -> dict:
    code = (
        "import json; from benchmarks import realistic as r; "
        f"print(json.dumps(r.one({name!r}, {implementation!r}, {repeats})))"
    )
    return in_child(code, {"model": name, "implementation": implementation}, timeout)


def markdown(rows: list[dict], command: str) -> str:
    from ntkcore.implementations import REGISTRY

    lines = [
        BEGIN,
        "## Realistic-width models, torch on CPU (generated)",
        "",
        f"Produced by `{command}`: float32, N = {N}, each (model, implementation) in a process of its own. "
        "Warm: the median of later calls; first: the first call (capture, probes and tracing included); "
        "peak: RSS above the level once the model was built. SD/JC and auto/fastest compare warm times.",
        "",
        "| model | params | structured share | implementation | warm s | first s | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = ["", "| model | fastest | auto picked | auto / fastest | SD / JC (speed-up) |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        good = {r["implementation"]: r for r in mine if "error" not in r}
        for r in mine:
            if "error" in r:
                lines.append(f"| {name} | | | {r['implementation']} | failed: {r['error']!r} | | |")
                continue
            lines.append(
                f"| {name} | {r['params']:,} | {r['structured_share']:.0%} | {r['implementation']} | "
                f"{r['seconds']:.3g} | {r['first_s']:.3g} | {r['peak_mb']:.0f} |"
            )
        exact = {k: v for k, v in good.items() if k in REGISTRY}
        if not exact:
            continue
        fastest = min(exact, key=lambda k: exact[k]["seconds"])
        auto = good.get("auto")
        ratio = f"{auto['seconds'] / exact[fastest]['seconds']:.2f}" if auto else "—"
        sd, jc = exact.get("structured"), exact.get("jacobian_contraction")
        speedup = f"{jc['seconds'] / sd['seconds']:.2f}×" if sd and jc else "—"
        picked = auto["auto_choice"] if auto else "—"
        summary.append(f"| {name} | {fastest} | {picked} | {ratio} | {speedup} |")
    return "\n".join([*lines, *summary, END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ntkcore.implementations import AUTO, REGISTRY

    parser = argparse.ArgumentParser(prog="python -m benchmarks.realistic", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--implementations", default=",".join([*REGISTRY, AUTO]))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default="benchmarks/results/realistic.json")
    parser.add_argument("--report", default="benchmarks/RESULTS.md")
    parser.add_argument("--update", action="store_true", help="replace only these rows of --out, keep the others")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for implementation in args.implementations.split(","):
            rows.append(_child(name, implementation, args.repeats, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    if args.update and Path(args.out).exists():
        new = {(r["model"], r["implementation"]): r for r in rows}
        old = json.loads(Path(args.out).read_text())
        rows = [new.pop((r["model"], r["implementation"]), r) for r in old] + list(new.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["python -m benchmarks.realistic", *(argv if argv is not None else sys.argv[1:])])
    command = f"python -m benchmarks.realistic`, then `{command}" if args.update else command
    report.write(Path(args.report), markdown(rows, command), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
