"""The model zoo, defined once: architectures in words and weights as seeded numpy arrays.

Every framework file (``jax_models.py``, ``torch_models.py``, ``tensorflow_models.py``) builds
each case from exactly these arrays, so a case's kernel is the same in every framework.
Conventions: dense weights are (in, out) with y = x @ w + b; convolution weights are HWIO on
NHWC inputs (a framework that wants NCHW/OIHW transposes inside the model, and flattens in
NHWC order); every input below is the per-example shape.

Cases:
- ``mlp``: 6 → 8 → 8 → 8 → 3, ReLU after each hidden layer.
- ``cnn``: (8, 8, 2) → zero-pad 1 → conv 3×3, 2→4 channels, stride 2 (4×4×4) → ReLU →
  average pool 2×2 stride 2 (2×2×4) → flatten (NHWC order, 16) → dense 16 → 3.
- ``lowrank``: h = relu(x·U1·V1 + b1) (6 → rank 2 → 8), h = relu(h·U2·V2 + b2) (8 → 2 → 8),
  out = h·W3 + b3 (8 → 3): the factorized layers of arXiv 2210.04807.
- ``layernorm``: dense 6 → 8 → LayerNorm (eps 1e-5, scale γ and shift β) → tanh → dense 8 → 3.
- ``batchnorm_frozen``: dense 6 → 8 → BatchNorm in inference mode (running mean/var as
  buffers, eps 1e-5, trainable γ, β) → ReLU → dense 8 → 8 *frozen* → ReLU → dense 8 → 3.
  Trainable: ``l1.*``, ``bn.gamma``, ``bn.beta``, ``l3.*``; constants: ``bn.mean``,
  ``bn.var``, ``l2.*``.
- ``multi_output``: dense 5 → 8 → tanh → dense 8 → 6 → reshape to (3, 2): output (N, 3, 2).
- ``wide`` (analysis tests only, not in ``CASES``): 6 → 512 → 3, ReLU, the width at which
  gradient-descent training stays close to its linearisation.
- ``transformer``: a pre-LayerNorm block over 4 token ids < 7: embedding table E (7 × 8);
  h = E[ids]; h = h + attention(LN1(h)) with 2 causal heads of width 4 (q, k, v and the output
  projection are dense 8 → 8 with bias; a head is 4 consecutive features; scores scaled by
  1/√4); h = h + dense 16 → 8 (relu(dense 8 → 16 (LN2(h)))); logits h·Eᵀ tied to the
  embedding: output (N, 4, 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaseSpec:
    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weights: dict[str, np.ndarray]
    constants: tuple[str, ...] = ()  # frozen weights and buffers: not parameters of the kernel
    vocabulary: int | None = None  # inputs are integer ids below this, not real features

    @property
    def n_trainable(self) -> int:
        return sum(w.size for k, w in self.weights.items() if k not in self.constants)


def _dense(rng: np.random.Generator, name: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
    return {
        f"{name}.w": rng.normal(size=(n_in, n_out)) / np.sqrt(n_in),
        f"{name}.b": 0.1 * rng.normal(size=(n_out,)),
    }


def _mlp(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {**_dense(rng, "l1", 6, 8), **_dense(rng, "l2", 8, 8), **_dense(rng, "l3", 8, 8), **_dense(rng, "l4", 8, 3)}


def _cnn(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.w": rng.normal(size=(3, 3, 2, 4)) / np.sqrt(18),
        "conv.b": 0.1 * rng.normal(size=(4,)),
        **_dense(rng, "head", 16, 3),
    }


def _lowrank(rng: np.random.Generator) -> dict[str, np.ndarray]:
    weights = {}
    for name, n_in in (("l1", 6), ("l2", 8)):
        weights[f"{name}.u"] = rng.normal(size=(n_in, 2)) / np.sqrt(n_in)
        weights[f"{name}.v"] = rng.normal(size=(2, 8)) / np.sqrt(2)
        weights[f"{name}.b"] = 0.1 * rng.normal(size=(8,))
    return {**weights, **_dense(rng, "l3", 8, 3)}


def _layernorm(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        **_dense(rng, "l1", 6, 8),
        "ln.gamma": 1.0 + 0.1 * rng.normal(size=(8,)),
        "ln.beta": 0.1 * rng.normal(size=(8,)),
        **_dense(rng, "l2", 8, 3),
    }


def _batchnorm_frozen(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        **_dense(rng, "l1", 6, 8),
        "bn.gamma": 1.0 + 0.1 * rng.normal(size=(8,)),
        "bn.beta": 0.1 * rng.normal(size=(8,)),
        "bn.mean": 0.2 * rng.normal(size=(8,)),
        "bn.var": 0.5 + rng.uniform(size=(8,)),
        **_dense(rng, "l2", 8, 8),
        **_dense(rng, "l3", 8, 3),
    }


def _multi_output(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {**_dense(rng, "l1", 5, 8), **_dense(rng, "l2", 8, 6)}


def _transformer(rng: np.random.Generator) -> dict[str, np.ndarray]:
    weights = {"embed.table": rng.normal(size=(7, 8))}
    for name in ("ln1", "ln2"):
        weights[f"{name}.gamma"] = 1.0 + 0.1 * rng.normal(size=(8,))
        weights[f"{name}.beta"] = 0.1 * rng.normal(size=(8,))
    for name in ("q", "k", "v", "o"):
        weights[f"attn.w{name}"] = rng.normal(size=(8, 8)) / np.sqrt(8)
        weights[f"attn.b{name}"] = 0.1 * rng.normal(size=(8,))
    return {**weights, **_dense(rng, "mlp1", 8, 16), **_dense(rng, "mlp2", 16, 8)}


def _wide(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {**_dense(rng, "l1", 6, WIDE), **_dense(rng, "l2", WIDE, 3)}


WIDE = 512
_BUILDERS = {
    "mlp": ((6,), (3,), _mlp, ()),
    "cnn": ((8, 8, 2), (3,), _cnn, ()),
    "lowrank": ((6,), (3,), _lowrank, ()),
    "layernorm": ((6,), (3,), _layernorm, ()),
    "batchnorm_frozen": ((6,), (3,), _batchnorm_frozen, ("bn.mean", "bn.var", "l2.w", "l2.b")),
    "multi_output": ((5,), (3, 2), _multi_output, ()),
    "transformer": ((4,), (4, 7), _transformer, ()),
    "wide": ((6,), (3,), _wide, ()),
}
_VOCABULARY = {"transformer": 7}
ANALYSIS_CASES = ("wide",)  # built by every zoo, but not part of the per-case conformance grid
CASES = tuple(name for name in _BUILDERS if name not in ANALYSIS_CASES)
N1, N2 = 4, 3


def spec(name: str) -> CaseSpec:
    """The case ``name`` with its weights (float64; frameworks cast to the tested dtype)."""
    input_shape, output_shape, build, constants = _BUILDERS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    return CaseSpec(name, input_shape, output_shape, build(rng), constants, _VOCABULARY.get(name))


def inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The x1 (N1 examples) and x2 (N2 examples) of case ``name``: float64, or integer ids."""
    case = spec(name)
    rng = np.random.default_rng(1000 + sum(map(ord, name)))
    if case.vocabulary is not None:
        return tuple(rng.integers(0, case.vocabulary, size=(n, *case.input_shape)) for n in (N1, N2))
    return rng.normal(size=(N1, *case.input_shape)), rng.normal(size=(N2, *case.input_shape))


def structured_inputs(name: str) -> tuple[np.ndarray, np.ndarray]:
    """x1 (4 examples) and x2 (3) of the structured-derivatives cases (each framework's own models).

    ``norms``/``convs`` take (8, 8, 2) images, ``twice``/``norule`` 6 features, the others 5
    token ids < 11.
    """
    rng = np.random.default_rng(2000 + sum(map(ord, name)))
    if name in ("norms", "convs"):
        return rng.normal(size=(4, 8, 8, 2)), rng.normal(size=(3, 8, 8, 2))
    if name in ("twice", "norule"):
        return rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    return rng.integers(0, 11, size=(4, 5)), rng.integers(0, 11, size=(3, 5))


# Readout models (tests/conformance/test_readout.py): h = tanh(x·w1 + b1) (5 → 4, per token of
# (3, 5) inputs), logits = h·A (+ b) over O = 11 > d = 4. Variants, every framework alike:
# ``bias``; ``no_bias``; ``frozen_body`` (w1, b1 frozen: only the readout trains);
# ``frozen_readout`` (A frozen: the general path); ``after_readout`` (+ (h·a)·z with z = 0, a
# branch after the readout whose gradient is not zero: the reduction must refuse it); ``tied``
# (ids < 11 through an embedding E (11 × 4) and logits h·Eᵀ: the general path).
READOUT_VARIANTS = {  # name -> whether the readout reduction applies
    "bias": True,
    "no_bias": True,
    "frozen_body": True,
    "frozen_readout": True,  # found with every parameter as θ; A and b constants
    "after_readout": False,
    "tied": False,
}


def readout_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "w1": rng.normal(size=(5, 4)) / np.sqrt(5),
        "b1": 0.1 * rng.normal(size=(4,)),
        "a": rng.normal(size=(4, 11)) / 2,
        "b": 0.1 * rng.normal(size=(11,)),
        "branch": rng.normal(size=(4, 2)),
        "zero": np.zeros((2, 11)),
        "embedding": rng.normal(size=(11, 4)),
        "w_tied": rng.normal(size=(4, 4)) / 2,
    }


def readout_inputs(variant: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12)
    if variant == "tied":
        return rng.integers(0, 11, size=(4, 3)), rng.integers(0, 11, size=(3, 3))
    return rng.normal(size=(4, 3, 5)), rng.normal(size=(3, 3, 5))


# The keyword-argument model (tests/conformance/test_model_kwargs.py): inputs (N, 3 tokens, 5),
# h = tanh(x·w1 + b1) (5 → 4) per token, zeroed where ``keep`` (N, 3) is 0, summed over tokens,
# out = (h·w2 + b2)·scale (4 → 3). The same model taking ``keep`` as a last input feature
# (inputs (N, 3, 6)) is the reference.
def kwargs_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(21)
    return {
        "w1": rng.normal(size=(5, 4)) / np.sqrt(5),
        "b1": 0.1 * rng.normal(size=(4,)),
        "w2": rng.normal(size=(4, 3)) / 2,
        "b2": 0.1 * rng.normal(size=(3,)),
    }


def kwargs_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x1 (4, 3, 5), keep1 (4, 3) booleans, x2 (3, 3, 5), keep2 (3, 3)."""
    rng = np.random.default_rng(22)
    keep1 = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=bool)
    keep2 = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 1]], dtype=bool)
    return rng.normal(size=(4, 3, 5)), keep1, rng.normal(size=(3, 3, 5)), keep2
