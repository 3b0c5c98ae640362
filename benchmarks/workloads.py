"""Benchmark workloads: defined once, saved as one .npz each, built in every framework from it.

A workload is a model family, its sizes, N and the kernel's axes. ``save`` writes its weights
(flat ``name → array``, from one seeded numpy RNG) and inputs to a .npz; every runner (ntkcore
in each framework, the torch.func baseline, neural-tangents in its own environment) builds its
model from that file, so all of them compute the same kernel. Only numpy is imported here: the
neural-tangents environment has none of ntkcore's dependencies.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "mlp", "factorized", "cnn", "resnet", "transformer"
    n: int
    widths: tuple[int, ...] = ()
    rank: int = 0
    axes: dict = field(default_factory=dict)

    @property
    def traced(self) -> bool:
        return bool(self.axes.get("trace_axes"))


MLP512 = (64, 512, 512, 512, 10)
TRACED = {"trace_axes": (-1,)}
# The table: the five workloads of the structured-derivatives issue, the ResNet block, the transformer.
WORKLOADS = {
    w.name: w
    for w in (
        Workload("mlp512_full", "mlp", 32, MLP512),
        Workload("mlp512_traced", "mlp", 32, MLP512, axes=TRACED),
        Workload("mlp2048_full", "mlp", 16, (64, 2048, 2048, 10)),
        Workload("cnn_full", "cnn", 16),
        Workload("cnn_traced", "cnn", 16, axes=TRACED),
        Workload("factorized_full", "factorized", 32, MLP512, rank=32),
        Workload("resnet_full", "resnet", 16),
        Workload("transformer_full", "transformer", 16),
        Workload("transformer_traced", "transformer", 16, axes=TRACED),
    )
}
# Scaling sweeps (traced NTK of a two-hidden-layer MLP): width at N = 8, and N at width 512.
WIDTH_SWEEP = tuple(Workload(f"width{w}", "mlp", 8, (64, w, w, 10), axes=TRACED) for w in (256, 512, 1024, 2048, 4096))
N_SWEEP = tuple(Workload(f"n{n}", "mlp", n, (64, 512, 512, 10), axes=TRACED) for n in (8, 16, 32, 64, 128, 256))
# A tiny workload and tiny sweeps for the CI smoke run of the harness.
SMOKE = Workload("smoke", "mlp", 4, (8, 16, 16, 3))
SMOKE_WIDTH = tuple(Workload(f"smoke_width{w}", "mlp", 4, (8, w, w, 3), axes=TRACED) for w in (8, 16, 32))
SMOKE_N = tuple(Workload(f"smoke_n{n}", "mlp", n, (8, 16, 16, 3), axes=TRACED) for n in (2, 4, 8))
ALL = {w.name: w for w in (*WORKLOADS.values(), *WIDTH_SWEEP, *N_SWEEP, SMOKE, *SMOKE_WIDTH, *SMOKE_N)}

# the transformer block: vocabulary, tokens, width, heads, MLP width; logits of the last token
VOCABULARY, TOKENS, WIDTH, HEADS, HIDDEN = 128, 16, 64, 4, 256
CHANNELS, IMAGE = 32, (16, 16, 3)  # CNN and ResNet block
BN_EPSILON = 1e-5


def weights(workload: Workload) -> dict[str, np.ndarray]:
    """Flat ``name → float64 array``, from a seeded RNG (the same for every framework)."""
    rng = np.random.default_rng(0)
    normal = rng.normal
    out: dict[str, np.ndarray] = {}
    if workload.kind == "transformer":  # pre-LayerNorm block, causal attention, logits tied to the embedding
        out["embed"] = normal(size=(VOCABULARY, WIDTH))
        for name, a, b in (*((c, WIDTH, WIDTH) for c in "qkvo"), ("mlp1", WIDTH, HIDDEN), ("mlp2", HIDDEN, WIDTH)):
            out[f"{name}.w"], out[f"{name}.b"] = normal(size=(a, b)) / np.sqrt(a), 0.1 * normal(size=b)
        for name in ("ln1", "ln2"):
            out[f"{name}.g"], out[f"{name}.b"] = 1 + 0.1 * normal(size=WIDTH), 0.1 * normal(size=WIDTH)
        return out
    if workload.kind in ("cnn", "resnet"):  # 3×3 convolutions (HWIO), CHANNELS wide, pool, dense 10
        for i, c in enumerate((IMAGE[2], CHANNELS, CHANNELS)):
            out[f"conv{i}.w"] = normal(size=(3, 3, c, CHANNELS)) / np.sqrt(9 * c)
            if workload.kind == "cnn" or i == 0:
                out[f"conv{i}.b"] = 0.1 * normal(size=CHANNELS)
            else:  # ResNet: conv → eval-mode BatchNorm, with running statistics as buffers
                out[f"bn{i}.g"], out[f"bn{i}.b"] = 1 + 0.1 * normal(size=CHANNELS), 0.1 * normal(size=CHANNELS)
                out[f"bn{i}.mean"], out[f"bn{i}.var"] = 0.1 * normal(size=CHANNELS), rng.uniform(0.5, 1.5, CHANNELS)
        out["head.w"], out["head.b"] = normal(size=(CHANNELS, 10)) / np.sqrt(CHANNELS), 0.1 * normal(size=10)
        return out
    widths = workload.widths
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if workload.kind == "factorized" and 0 < i < len(widths) - 2:
            out[f"layer{i}.u"] = normal(size=(a, workload.rank)) / np.sqrt(a)
            out[f"layer{i}.v"] = normal(size=(workload.rank, b)) * np.sqrt(2 / workload.rank)
        else:
            out[f"layer{i}.w"] = normal(size=(a, b)) * np.sqrt(2 / a)
        out[f"layer{i}.b"] = 0.1 * normal(size=b)
    return out


BUFFERS = (".mean", ".var")  # non-trainable entries of ``weights``


def inputs(workload: Workload) -> np.ndarray:
    rng = np.random.default_rng(1)
    if workload.kind == "transformer":
        return rng.integers(0, VOCABULARY, size=(workload.n, TOKENS)).astype(np.int32)
    shape = IMAGE if workload.kind in ("cnn", "resnet") else (workload.widths[0],)
    return rng.normal(size=(workload.n, *shape)).astype(np.float32)


def save(workload: Workload, directory: Path) -> Path:
    """Write the workload's weights and inputs (key ``x``) to ``directory/<name>.npz``."""
    path = Path(directory) / f"{workload.name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=inputs(workload), **weights(workload))
    return path


def load(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(weights, inputs) from a file written by :func:`save`."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, arrays.pop("x")


def layers(workload: Workload) -> list[tuple[str, int, int, int, int]]:
    """Parameterised layers as (kind, fan-in, fan-out, positions, parameters): the input of the FLOP counts."""
    w = {k: v.shape for k, v in weights(workload).items()}
    out: list[tuple[str, int, int, int, int]] = []
    if workload.kind == "transformer":
        out.append(("embedding", VOCABULARY, WIDTH, TOKENS, VOCABULARY * WIDTH))
        for name in ("q", "k", "v", "o", "mlp1", "mlp2"):
            a, b = w[f"{name}.w"]
            out.append(("dense", a + 1, b, TOKENS, (a + 1) * b))
        out += [("scale", 2, WIDTH, TOKENS, 2 * WIDTH)] * 2
        out.append(("dense", WIDTH, VOCABULARY, 1, 0))  # tied logits: the table's second use, no new parameters
        return out
    if workload.kind in ("cnn", "resnet"):
        positions = IMAGE[0] * IMAGE[1]
        for i in range(3):
            kh, kw, c, d = w[f"conv{i}.w"]
            fan_in = kh * kw * c + (f"conv{i}.b" in w)
            out.append(("dense", fan_in, d, positions, fan_in * d))
            if f"bn{i}.g" in w:
                out.append(("scale", 2, d, positions, 2 * d))
        out.append(("dense", CHANNELS + 1, 10, 1, (CHANNELS + 1) * 10))
        return out
    for i in range(len(workload.widths) - 1):
        if f"layer{i}.u" in w:
            (a, r), (_, b) = w[f"layer{i}.u"], w[f"layer{i}.v"]
            out += [("dense", a, r, 1, a * r), ("dense", r + 1, b, 1, (r + 1) * b)]
        else:
            a, b = w[f"layer{i}.w"]
            out.append(("dense", a + 1, b, 1, (a + 1) * b))
    return out


def build(backend: str, workload: Workload, arrays: dict[str, np.ndarray], dtype: str = "float32") -> tuple[Any, dict]:
    """(model, extra keyword arguments for ``ntkcore.ntk_fn``) in ``backend``'s framework."""
    if backend == "jax":
        from benchmarks import jax_models

        return jax_models.build(workload, arrays, dtype)
    if backend == "torch":
        from benchmarks import torch_models

        return torch_models.build(workload, arrays, dtype), {}
    if backend == "tensorflow":
        from benchmarks import keras_models

        return keras_models.build(workload, arrays, dtype), {}
    raise ValueError(f"backend: expected 'jax', 'torch' or 'tensorflow', got {backend!r}")
