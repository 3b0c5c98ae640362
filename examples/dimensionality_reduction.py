"""Dimensionality reduction for the NTK (Ailon and Shit, arXiv 2210.04807), in every framework.

The two-layer ReLU network of the NTK convergence analyses, f(x) = (1/√m) Σ_r a_r·relu(w_rᵀx),
with a_r = ±1 fixed and the first layer W (d → m) trained by gradient descent on
L = ½‖f(X) − y‖², on n points of dimension d = n (unit norm, random labels). Gradient descent
converges linearly at the rate λ_min of the NTK Gram predicts, ‖r_t‖² ≤ (1 − η·λ_min)^(2t)·‖r_0‖²
while the kernel stays near its initial value, which is why λ_min drives the width the
guarantees need. ``ntkcore.factorize`` replaces W by U·V of rank k:

- ``trainable="u"``: V a fixed random projection, only U (d·k parameters) is trained, the
  dimensionality-reduction setting;
- ``trainable="both"``: U and V trained, initialised by the truncated SVD of W.

For widths m and ranks k the script reports λ_min at initialisation, the trainable parameter
count and the NTK compute time, and trains the dense and the factorized networks against the
rate λ_min predicts; every installed framework runs the same data and initial weights, and
their λ_min must agree. It writes a PNG and a markdown table:

    python examples/dimensionality_reduction.py [--out examples/results] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import ntkcore

N = D = 64  # points and input dimension: d of the order of n
WIDTHS = (64, 256, 1024, 4096)  # dense λ_min against the width
WIDTH = 1024  # the width of the rank sweep and of the training runs
RANKS = (1, 2, 4, 8, 16, 32, 64)
TRAINED_RANK = 16
STEPS = 60  # long enough for the slowest mode to set the rate, short of float64's floor


def problem(seed: int = 0) -> dict[str, np.ndarray]:
    """The shared data and initial weights: x on the unit sphere, y ~ N(0, 1), W ~ N(0, 1), a = ±1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    return {
        "x": x / np.linalg.norm(x, axis=1, keepdims=True),
        "y": rng.normal(size=(N, 1)),
        "w": rng.normal(size=(D, max(WIDTHS))),
        "a": rng.choice([-1.0, 1.0], size=max(WIDTHS)),
    }


# -- the network and its training loop, per framework ----------------------------------------
class Torch:
    name, layer = "torch", "0"  # the backend, and the name of W's layer

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def network(self, w: np.ndarray, a: np.ndarray) -> tuple[Any, dict]:
        torch, nn = self.torch, self.torch.nn
        model = nn.Sequential(nn.Linear(*w.shape, bias=False), nn.ReLU(), nn.Linear(w.shape[1], 1, bias=False))
        model = model.double()
        with torch.no_grad():
            model[0].weight.copy_(torch.as_tensor(w.T))
            model[2].weight.copy_(torch.as_tensor(a[None, :] / np.sqrt(len(a))))
        model[2].weight.requires_grad_(False)
        return model, {}

    def native(self, x: np.ndarray) -> Any:
        return self.torch.as_tensor(x)

    def train(self, model: Any, kwargs: dict, x: np.ndarray, y: np.ndarray, lr: float, steps: int) -> list[float]:
        torch = self.torch
        params = [p for p in model.parameters() if p.requires_grad]
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        losses = []
        for _ in range(steps + 1):
            loss = 0.5 * ((model(xt) - yt) ** 2).sum()
            losses.append(loss.item())
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * g
        return losses


class Jax:
    name, layer = "jax", "w"

    def __init__(self) -> None:
        import jax

        jax.config.update("jax_enable_x64", True)
        self.jax = jax

    def network(self, w: np.ndarray, a: np.ndarray) -> tuple[Any, dict]:
        jnp = self.jax.numpy
        head = jnp.asarray(a / np.sqrt(len(a)))[:, None]  # fixed: a constant of apply, not a parameter

        def apply(params: dict, x: Any) -> Any:
            return self.jax.nn.relu(x @ params["w"]) @ head

        return apply, {"params": {"w": jnp.asarray(w)}}

    def native(self, x: np.ndarray) -> Any:
        return self.jax.numpy.asarray(x)

    def train(self, model: Any, kwargs: dict, x: np.ndarray, y: np.ndarray, lr: float, steps: int) -> list[float]:
        jax, jnp = self.jax, self.jax.numpy
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        loss_and_grad = jax.jit(jax.value_and_grad(lambda p: 0.5 * jnp.sum((model(p, xj) - yj) ** 2)))
        params, losses = kwargs["params"], []
        for _ in range(steps + 1):
            loss, grads = loss_and_grad(params)
            losses.append(float(loss))
            params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
        return losses


class Keras:
    name, layer = "tensorflow", "hidden"

    def __init__(self) -> None:
        import keras
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # each network's kernel function is traced once, on purpose
        self.keras, self.tf = keras, tf

    def network(self, w: np.ndarray, a: np.ndarray) -> tuple[Any, dict]:
        layers = self.keras.layers
        model = self.keras.Sequential(
            [
                self.keras.Input((w.shape[0],), dtype="float64"),
                layers.Dense(w.shape[1], use_bias=False, activation="relu", dtype="float64", name="hidden"),
                layers.Dense(1, use_bias=False, trainable=False, dtype="float64", name="head"),
            ]
        )
        model.layers[0].set_weights([w])
        model.layers[1].set_weights([a[:, None] / np.sqrt(len(a))])
        return model, {}

    def native(self, x: np.ndarray) -> Any:
        return self.tf.constant(x)

    def train(self, model: Any, kwargs: dict, x: np.ndarray, y: np.ndarray, lr: float, steps: int) -> list[float]:
        tf = self.tf
        xt, yt = tf.constant(x), tf.constant(y)
        variables = model.trainable_variables

        @tf.function
        def step() -> Any:
            with tf.GradientTape() as tape:
                loss = 0.5 * tf.reduce_sum((model(xt, training=False) - yt) ** 2)
            for v, g in zip(variables, tape.gradient(loss, variables)):
                v.assign_sub(lr * g)
            return loss

        return [float(step()) for _ in range(steps + 1)]


FRAMEWORKS: dict[str, Callable[[], Any]] = {"torch": Torch, "jax": Jax, "tensorflow": Keras}


# -- measurements -----------------------------------------------------------------------------
def trainable_count(model: Any, kwargs: dict, backend: str) -> int:
    prepared = ntkcore.get_backend(backend).prepare(model, kwargs.get("params"))
    return sum(int(np.prod(p.shape)) for p in prepared.params.values())


def measure(fw: Any, model: Any, kwargs: dict, x: Any, repeats: int) -> dict:
    """λ_min, λ_max, the kernel and the median time of ``ntk`` (after one call that warms up)."""
    kernel_fn = ntkcore.ntk_fn(model, trace_axes=(-1,), **kwargs)
    kernel = kernel_fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        kernel = kernel_fn(x)
        np.asarray(ntkcore.get_backend(fw.name).to_numpy(kernel))
        times.append(time.perf_counter() - start)
    spectrum = ntkcore.spectrum(kernel)
    return {
        "lambda_min": spectrum.lambda_min,
        "lambda_max": spectrum.lambda_max,
        "params": trainable_count(model, kwargs, fw.name),
        "seconds": statistics.median(times),
    }


def factorized(fw: Any, model: Any, kwargs: dict, rank: int, trainable: str) -> tuple[Any, dict]:
    out = ntkcore.factorize(model, rank, layers=[fw.layer], trainable=trainable, params=kwargs.get("params"))
    return (out[0], {"params": out[1]}) if isinstance(out, tuple) else (out, {})


def run(fw: Any, data: dict, widths: tuple, ranks: tuple, steps: int, repeats: int) -> dict:
    x = fw.native(data["x"])
    rows: dict = {}
    for m in sorted({*widths, WIDTH}):  # the rank sweep's width too: it is the reference
        model, kwargs = fw.network(data["w"][:, :m], data["a"][:m])
        rows[("dense", m, None)] = measure(fw, model, kwargs, x, repeats)
    dense, kwargs = fw.network(data["w"][:, :WIDTH], data["a"][:WIDTH])
    for trainable in ("u", "both"):
        for k in ranks:
            model, kw = factorized(fw, dense, kwargs, k, trainable)
            rows[(trainable, WIDTH, k)] = measure(fw, model, kw, x, repeats)
    curves = {}
    for key in (("dense", WIDTH, None), ("u", WIDTH, TRAINED_RANK), ("both", WIDTH, TRAINED_RANK)):
        dense, kwargs = fw.network(data["w"][:, :WIDTH], data["a"][:WIDTH])  # torch and Keras train in place
        model, kw = (dense, kwargs) if key[0] == "dense" else factorized(fw, dense, kwargs, key[2], key[0])
        lr = 1.0 / rows[key]["lambda_max"]  # stable: η·λ_max = 1 < 2
        curves[key] = {"lr": lr, "loss": fw.train(model, kw, data["x"], data["y"], lr, steps)}
    return {"rows": rows, "curves": curves}


# -- report -------------------------------------------------------------------------------------
LABEL = {"dense": "dense", "u": "U·V, V fixed (train U)", "both": "U·V (train both)"}


def _label(key: tuple) -> str:
    kind, m, k = key
    return f"dense, m = {m}" if kind == "dense" else f"{LABEL[kind]}, m = {m}, k = {k}"


def markdown(results: dict, frameworks: list[str], seconds: float) -> str:
    first = results[frameworks[0]]
    head = "| network | trainable parameters | λ_min | λ_max | " + " | ".join(f"NTK ms ({f})" for f in frameworks)
    lines = [
        "# Dimensionality reduction: λ_min, parameters, NTK time and training (generated)",
        "",
        f"Written by `python examples/dimensionality_reduction.py` in {seconds:.0f} s; frameworks: "
        f"{', '.join(frameworks)}; n = {N} points of dimension d = {D}, two-layer ReLU network, "
        f"second layer fixed to ±1/√m. λ from ntkcore's NTK of the first framework; every other "
        "framework's agrees within the spread below. NTK times are medians of 5 calls; at this size they "
        "are mostly per-call overhead (the cost against the rank at a size where it shows is in "
        "`benchmarks/RESULTS.md`, from `python -m benchmarks.rank`).",
        "",
        head + " |",
        "|---|---|---|---|" + "---|" * len(frameworks),
    ]
    for key, row in first["rows"].items():
        times = " | ".join(f"{results[f]['rows'][key]['seconds'] * 1e3:.1f}" for f in frameworks)
        lines.append(
            f"| {_label(key)} | {row['params']} | {row['lambda_min']:.4g} | {row['lambda_max']:.4g} | {times} |"
        )
    spread = max(
        abs(results[f]["rows"][key]["lambda_min"] - row["lambda_min"]) / abs(row["lambda_max"])
        for f in frameworks
        for key, row in first["rows"].items()
    )
    lines += ["", f"Largest difference of λ_min between frameworks, relative to λ_max: {spread:.1e}.", ""]
    lines += [
        "Training (full-batch gradient descent, η = 1/λ_max, L = ½‖f − y‖², T steps): the loss, and its "
        "decay per step over the last half of the run against (1 − η·λ_min)², the rate the kernel at "
        "initialisation predicts for the slowest direction while the kernel stays near its initial value.",
        "",
        "| network | framework | κ = λ_max/λ_min | T | L_0 | L_T | measured decay per step | (1 − η·λ_min)² |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in frameworks:
        for key, curve in results[f]["curves"].items():
            loss, lr, row = curve["loss"], curve["lr"], first["rows"][key]
            steps = len(loss) - 1
            measured = (loss[-1] / loss[steps // 2]) ** (1 / (steps - steps // 2))
            lines.append(
                f"| {_label(key)} | {f} | {row['lambda_max'] / row['lambda_min']:.3g} | {steps} | {loss[0]:.4g} | "
                f"{loss[-1]:.3g} | {measured:.4f} | {(1 - lr * row['lambda_min']) ** 2:.4f} |"
            )
    return "\n".join(lines) + "\n", spread


def plot(results: dict, frameworks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[frameworks[0]]["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    dense = [(m, r["lambda_min"]) for (kind, m, _), r in first.items() if kind == "dense"]
    ax.plot(*zip(*dense), "o-", label="dense: λ_min vs width m")
    for kind, marker in (("u", "s"), ("both", "^")):
        points = [(k, r["lambda_min"]) for (kind2, _, k), r in first.items() if kind2 == kind]
        ax.plot(*zip(*points), marker + "--", label=f"{LABEL[kind]}: λ_min vs rank k (m = {WIDTH})")
    ax.set(xscale="log", yscale="log", xlabel="width m, or rank k", ylabel="NTK λ_min at initialisation")
    ax.set_title("smallest eigenvalue")
    ax.legend(fontsize=8)
    ax = axes[1]
    for f, colour in zip(frameworks, ("C0", "C1", "C2")):
        rows = results[f]["rows"]
        for kind, style in (("u", "s--"), ("both", "^:")):
            points = [(k, r["seconds"] * 1e3) for (kind2, _, k), r in rows.items() if kind2 == kind]
            ax.plot(*zip(*points), style, color=colour, label=f"{f}, {LABEL[kind]}")
        ax.axhline(rows[("dense", WIDTH, None)]["seconds"] * 1e3, color=colour, lw=0.8, label=f"{f}, dense")
    ax.set(xscale="log", yscale="log", xlabel=f"rank k (m = {WIDTH})", ylabel="NTK time (ms), median")
    ax.set_title("NTK time: per-call overhead at this size\n(scaling with rank: benchmarks/RESULTS.md)")
    ax.legend(fontsize=7)
    ax = axes[2]
    colours = {"dense": "C0", "u": "C1", "both": "C2"}
    for f, style in zip(frameworks, ("-", "--", ":")):
        for key, curve in results[f]["curves"].items():
            loss = np.asarray(curve["loss"])
            ax.plot(loss / loss[0], style, color=colours[key[0]], label=f"{_label(key)} ({f})")
    for key, curve in results[frameworks[0]]["curves"].items():
        t = np.arange(len(curve["loss"]))
        ax.plot(t, (1 - curve["lr"] * first[key]["lambda_min"]) ** (2 * t), color=colours[key[0]], lw=0.8, alpha=0.6)
    ax.set(yscale="log", xlabel="gradient descent step", ylabel="L_t / L_0", ylim=(1e-16, 2))
    ax.set_title("training loss; thin lines: (1 − η·λ_min)^(2t)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results", help="directory for the PNG and the markdown table")
    parser.add_argument("--quick", action="store_true", help="a small sweep (seconds), for the test suite")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    names = [name for name in FRAMEWORKS if name in ntkcore.installed_backends()]
    if not names:
        print("no framework installed: pip install 'ntkcore[all]'", file=sys.stderr)
        return 1
    widths, ranks, steps, repeats = (WIDTHS[:2], (2, 16), 20, 1) if args.quick else (WIDTHS, RANKS, STEPS, 5)
    data = problem()
    results = {}
    for name in names:
        t = time.perf_counter()
        results[name] = run(FRAMEWORKS[name](), data, widths, ranks, steps, repeats)
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text, spread = markdown(results, names, time.perf_counter() - start)
    (out / "dimensionality_reduction.md").write_text(text)
    plot(results, names, out / "dimensionality_reduction.png")
    print(text)
    if spread > 1e-6:  # float64 everywhere: the frameworks compute one kernel
        print(f"frameworks disagree on λ_min by {spread:.1e} of λ_max", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
