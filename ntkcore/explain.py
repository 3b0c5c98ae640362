"""What ``implementation="auto"`` decides and why: the result of :func:`ntkcore.explain`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .axes import KernelAxes
from .cost_model import Estimate, ModelShape
from .implementations.structured import describe
from .sizes import CallSizes


class MemoryBudgetError(MemoryError):
    """No implementation's predicted peak memory fits the budget of ``implementation="auto"``."""


@dataclass(frozen=True)
class LayerRule:
    """One layer as structured derivatives would treat it."""

    name: str
    kind: str
    params: int
    rule: str  # the rule and its contraction order, "framework gradients", or "fallback: why"


@dataclass(frozen=True)
class Explanation:
    """Predicted costs of every implementation for one call, and the choice among them."""

    backend: str
    device: str
    dtype: str
    n1: int
    n2: int | None  # None: x2 = x1, work reused
    out_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    choice: str | None  # None: nothing fits the memory budget
    estimates: Mapping[str, Estimate]
    budget_bytes: float | None
    budget_source: str
    layers: tuple[LayerRule, ...]
    structured_unavailable: str | None = None  # why structured derivatives are not a candidate
    failed: Mapping[str, str] = field(default_factory=dict)  # implementations that raised on this model
    readout: str | None = None  # the readout reduction every implementation applies (ntkcore.readout)

    def budget_message(self) -> str:
        """The error text when nothing fits: what each method needs and what to do."""
        return budget_message(self.estimates, self.budget_bytes, self.budget_source, self.kernel_shape)

    def __str__(self) -> str:
        second = "x2 = x1" if self.n2 is None else f"N2 = {self.n2}"
        budget = "no limit" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        lines = [
            f"ntkcore.explain: {self.backend} on {self.device}, {self.dtype}, N1 = {self.n1}, {second}, "
            f"output per example {self.out_shape}, kernel {self.kernel_shape}",
            f"memory budget: {budget} ({self.budget_source})",
            "",
            f"{'implementation':<22} {'GFLOP':>10} {'peak memory':>12} {'predicted':>11}  fits",
        ]
        for name, e in self.estimates.items():
            fits = "yes" if self.budget_bytes is None or e.peak_bytes <= self.budget_bytes else "no"
            mark = ("  (readout reduced)" if e.readout else "") + ("  <- choice" if name == self.choice else "")
            peak, seconds = format_bytes(e.peak_bytes), _seconds(e.seconds)
            lines.append(f"{name:<22} {e.flops / 1e9:>10.4g} {peak:>12} {seconds:>11}  {fits}{mark}")
        if self.readout:
            lines.append(self.readout)
        if self.structured_unavailable:
            lines.append(f"structured: not a candidate ({self.structured_unavailable})")
        for name, error in self.failed.items():
            lines.append(f"{name}: not a candidate (it raised on this model: {error})")
        if self.choice is None:
            lines += ["", self.budget_message()]
        if self.layers:
            lines += ["", "layers, as structured derivatives treat them:"]
            width = max(len(layer.name) for layer in self.layers)
            for layer in self.layers:
                lines.append(f"  {layer.name:<{width}}  {layer.kind:<9} {layer.params:>10} params  {layer.rule}")
        return "\n".join(lines)


def choose(estimates: Mapping[str, Estimate], budget: float | None) -> str | None:
    """The implementation predicted fastest among those whose peak fits ``budget`` (None: none fits)."""
    fitting = [e for e in estimates.values() if budget is None or e.peak_bytes <= budget]
    return min(fitting, key=lambda e: e.seconds).implementation if fitting else None


def budget_message(
    estimates: Mapping[str, Estimate], budget: float | None, source: str, kernel_shape: tuple[int, ...]
) -> str:
    """Why nothing fits ``budget``: what each method needs, and what to do."""
    needs = ", ".join(f"{name} ~{format_bytes(e.peak_bytes)}" for name, e in estimates.items())
    return (
        f"no implementation fits the memory budget of {format_bytes(budget)} ({source}) for a "
        f"kernel of shape {kernel_shape}: predicted peaks are {needs}. Compute less at once: "
        "trace_axes=(-1,) sums over the output axis (O times fewer entries), "
        "diagonal_axes=(0,) keeps only pairs x1[i], x2[i]; batch_size= computes the kernel tile by tile "
        "and out='kernel.zarr' writes it to disk; or raise memory_budget=."
    )


def describe_layers(
    shape: ModelShape, n1: int, n2: int | None, out_shape: tuple[int, ...], axes: KernelAxes
) -> tuple[LayerRule, ...]:
    """Each captured layer with the rule structured derivatives would apply (for dense layers,
    the contraction order the rule picks at these sizes)."""
    sizes = CallSizes.of(n1, n2, out_shape, axes)
    return tuple(
        LayerRule(layer.name, layer.kind, sum(layer.sizes.values()), describe(layer, sizes)) for layer in shape.layers
    )


def format_bytes(n: float | None) -> str:
    """Bytes as kB/MB/GB, for messages."""
    if n is None:
        return "unknown"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"
