"""The readout reduction on GPT-2-shaped language models (torch, CPU): the kernel of the logits
traced over the vocabulary, with and without the reduction, beside the kernel of the hidden
state alone (the readout removed: outputs = h), side by side.

    python -m benchmarks.readout [--configs 256x1000,256x50257] [--n 8] [--runs logits:on:auto,...]

transformers' GPT-2 with an untied readout (``tie_word_embeddings=False``; a tied one keeps the
general path), 2 layers, 32 tokens, float32, N = 8 (``--n``), random weights; the model computes the last
token's logits only (``logits_to_keep=1``, as generation does). Each run is a process of its
own (a peak or a kill is its own); rows: warm time (median of later calls), first call, peak RSS.
Results go to ``results/readout.json`` and a generated section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.realistic import in_child, timed

BEGIN = "<!-- begin: written by `python -m benchmarks.readout`; do not edit by hand -->"
END = "<!-- end: written by `python -m benchmarks.readout` -->"
N, TOKENS = 8, 32  # N: the default of --n
REPEATS = 2  # the default of --repeats
_STARTED = time.perf_counter()  # a child imports this module first: its setup is counted from here
# (output, reduce_readout, implementation) per configuration
RUNS = [
    ("logits", True, "auto"),
    ("logits", True, "jacobian_contraction"),
    ("logits", True, "ntk_vector_products"),
    ("logits", True, "structured"),
    ("logits", False, "auto"),
    ("logits", False, "jacobian_contraction"),
    ("hidden", True, "auto"),
]


def build(config: str, output: str, n: int = N) -> tuple[Any, Any, dict]:
    """(model, ids, ntk options): ``output`` "logits" (the vocabulary, traced) or "hidden"."""
    import torch
    import transformers as hf

    width, vocabulary = (int(v) for v in config.split("x"))
    torch.manual_seed(0)
    cfg = hf.GPT2Config(
        n_embd=width, n_layer=2, n_head=4, vocab_size=vocabulary, n_positions=64, tie_word_embeddings=False
    )
    cfg._attn_implementation = "eager"
    model = hf.GPT2LMHeadModel(cfg).eval()

    class LastToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, ids: Any) -> Any:
            if output == "hidden":
                return self.lm.transformer(ids).last_hidden_state[:, -1]
            return self.lm(ids, logits_to_keep=1).logits[:, -1]

    ids = torch.randint(1, vocabulary, (n, TOKENS))
    wrapper = LastToken().eval()
    if output == "hidden":  # the readout removed: its weight is not a parameter of this kernel
        model.lm_head.weight.requires_grad_(False)
    return wrapper, ids, {"trace_axes": (-1,)}


def one(config: str, output: str, reduce: bool, implementation: str, repeats: int, n: int = N) -> dict:
    import ntkcore

    model, x, options = build(config, output, n)
    options["reduce_readout"] = reduce
    explanation = ntkcore.explain(model, x, **options)
    predicted = explanation.estimates.get(explanation.choice if implementation == "auto" else implementation)
    row = {
        "config": config,
        "n": n,
        "output": output,
        "reduce": reduce,
        "implementation": implementation,
        "auto_choice": explanation.choice,
        "readout": explanation.readout is not None,
        "predicted_s": predicted.seconds if predicted else None,
        "predicted_mb": predicted.peak_bytes / 1e6 if predicted else None,
        "setup_s": time.perf_counter() - _STARTED,  # imports, model, explain: inside the time limit
    }
    print(json.dumps(row), flush=True)  # the prediction stays in the row of a run stopped or refused
    return {**row, **timed(lambda: ntkcore.ntk(model, x, implementation=implementation, **options), repeats)}


def _child(args: tuple, timeout: float) -> dict:
    config, output, reduce, implementation, _, n = args
    row = {"config": config, "n": n, "output": output, "reduce": reduce, "implementation": implementation}
    return in_child(
        f"import json; from benchmarks import readout as r; print(json.dumps(r.one(*{args!r})))", row, timeout
    )


def markdown(rows: list[dict]) -> str:
    commands = "`, then `".join(dict.fromkeys(r["command"] for r in rows))
    lines = [
        BEGIN,
        "## The readout reduction: GPT-2-shaped language models, torch on CPU (generated)",
        "",
        f"Produced by `{commands}`: untied readout, 2 layers, {TOKENS} tokens, float32, the last "
        "token's logits traced over the vocabulary; each run in a process of its own. `hidden`: the same "
        "model's kernel of its last hidden state (the readout removed), at the same N. Ratio: warm time over "
        "`hidden`'s. Predicted: the cost model's seconds and peak for that implementation (`ntkcore.explain`; "
        "runs before it was recorded have none). `--repeats 0`: the first call only (its warm column repeats it). "
        "A run stopped by its time limit: a lower bound on one call, the limit less the setup (imports, model, "
        "explain), over the calls it had to make.",
        "",
        "| n_embd × vocabulary | N | output | reduction | implementation | auto picked | warm s | first s | peak MB "
        "| / hidden | predicted s | predicted MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, n in dict.fromkeys((r["config"], r["n"]) for r in rows):
        mine = sorted((r for r in rows if (r["config"], r["n"]) == (config, n)), key=_order)
        hidden = next((r for r in mine if r["output"] == "hidden" and "error" not in r), None)
        for r in mine:
            reduction = "on" if r["reduce"] else "off"
            head = f"| {config} | {n} | {r['output']} | {reduction} | {r['implementation']} |"
            seconds, peak = r.get("predicted_s"), r.get("predicted_mb")
            tail = f" {'' if seconds is None else f'{seconds:.3g}'} | {'' if peak is None else f'{peak:.0f}'} |"
            if "error" in r:
                per_call = _per_call(r)
                bound = f"> {per_call / hidden['seconds']:.1f}" if per_call and hidden else ""
                lines.append(f"{head} {r.get('auto_choice') or ''} | {_failure(r, per_call)} | | | {bound} |{tail}")
                continue
            ratio = f"{r['seconds'] / hidden['seconds']:.2f}" if hidden else "—"
            lines.append(
                f"{head} {r['auto_choice']} | {r['seconds']:.3g} | {r['first_s']:.3g} | {r['peak_mb']:.0f} | {ratio} |"
                + tail
            )
    return "\n".join([*lines, END]) + "\n"


def _per_call(row: dict) -> float | None:
    """A stopped run's lower bound on one call: the time limit less the setup, over the calls it
    had to make (the first and ``--repeats`` more; setup unrecorded: 0)."""
    stopped = re.fullmatch(r"stopped after (\d+) s", row["error"])
    if not stopped:
        return None
    repeats = re.search(r"--repeats (\d+)", row.get("command", ""))
    calls = 1 + (int(repeats[1]) if repeats else REPEATS)
    return (float(stopped[1]) - row.get("setup_s", 0.0)) / calls


def _failure(row: dict, per_call: float | None) -> str:
    """A failed run in a few words: stopped by the time limit, refused by the memory budget."""
    refused = re.search(r"need ([\d.e+]+ GB) .* budget of ([\d.]+ GB)", row["error"])
    if refused:
        return f"refused: {refused[1]} predicted, budget {refused[2]}"
    return f"> {per_call:.0f} s a call ({row['error']})" if per_call else f"failed: {row['error']!r}"


def _order(row: dict) -> tuple:
    """Logits before the hidden state, the reduction on before off, then by implementation."""
    names = [i for _, _, i in RUNS]
    return row["output"] == "hidden", not row["reduce"], names.index(row["implementation"])


def _run(row: dict) -> tuple:
    return row["config"], row["n"], row["output"], row["reduce"], row["implementation"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readout", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="256x1000,256x50257")
    parser.add_argument("--n", type=int, default=N, help="examples")
    parser.add_argument(
        "--runs",
        default=",".join(f"{o}:{'on' if r else 'off'}:{i}" for o, r, i in RUNS),
        help="output:reduction:implementation, comma-separated",
    )
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default="benchmarks/results/readout.json")
    parser.add_argument("--report", default="benchmarks/RESULTS.md")
    parser.add_argument("--update", action="store_true", help="keep the other runs' rows of --out")
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    runs = [(o, r == "on", i) for o, r, i in (run.split(":") for run in args.runs.split(","))]
    command = " ".join(["python -m benchmarks.readout", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    for config in configs:
        for output, reduce, implementation in runs:
            rows.append(_child((config, output, reduce, implementation, args.repeats, args.n), args.timeout))
            rows[-1]["command"] = command
            print(json.dumps(rows[-1]), flush=True)
    if args.update and Path(args.out).exists():  # a run measured again replaces its row, in place
        fresh = {_run(r): r for r in rows}
        old = [fresh.pop(_run(r), r) for r in json.loads(Path(args.out).read_text())]
        rows = old + list(fresh.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    report.write(Path(args.report), markdown(rows), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
