"""What an implementation is: a kernel, per-layer kernels and a cost estimate behind one small
interface, so that ``auto``, ``explain``, the demo, the benchmarks and the tests read one table
(:data:`ntkcore.implementations.REGISTRY`) and name no implementation themselves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..axes import KernelAxes
from ..model_shape import ModelShape
from ..protocol import ApplyFn, AutodiffBackend, Capture, Params
from ..sizes import CallSizes


@dataclass(frozen=True)
class KernelCall:
    """The static setting of one kernel computation: everything but parameters and inputs.

    ``coupled``: the examples of a batch interact (``batch_independent=False``), so every
    derivative is taken of the whole batch. ``capture``: the adapter's layer capture, for
    implementations with ``uses_capture``.
    """

    backend: AutodiffBackend
    apply: ApplyFn
    axes: KernelAxes
    out_shape: tuple[int, ...]
    coupled: bool = False
    capture: Capture | None = None

    def shapes(self, x1: Any, x2: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """f's output shapes (N, *out) on the two sides (``x2=None``: x1's)."""
        shape1 = (x1.shape[0], *self.out_shape)
        return shape1, shape1 if x2 is None else (x2.shape[0], *self.out_shape)


@dataclass(frozen=True)
class Cost:
    """An implementation's predicted work: FLOPs of forward/backward passes and of contractions,
    and elements held at once (``peak``) and streamed through memory (``traffic``)."""

    passes: float
    contraction: float
    peak: float
    traffic: float


class Method:
    """One implementation. Subclasses set ``name`` (the ``implementation=`` string) and
    ``label`` (the benchmarks' short name), and implement :meth:`kernel` and :meth:`cost`.

    ``uses_capture``: needs the adapter's layer capture (it is not a candidate where the
    adapter cannot capture). ``batch_coupled``: computes the kernel of a batch whose examples
    interact; one that cannot is replaced by ``coupled_substitute`` there, with a warning.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    title: ClassVar[str]  # in prose: "Jacobian contraction"
    uses_capture: ClassVar[bool] = False
    batch_coupled: ClassVar[bool] = True
    coupled_substitute: ClassVar[str] = "jacobian_contraction"
    compiled: ClassVar[bool] = True  # run under the framework's compiler as one function

    @property
    def key(self) -> Any:
        """What tells compiled kernels of this implementation apart (its options too)."""
        return (self.name, type(self))

    def kernel(self, call: KernelCall, params: Params, x1: Any, x2: Any) -> Any:
        """The kernel between ``x1`` and ``x2`` (``x2=None``: x1, its work reused)."""
        raise NotImplementedError

    def per_layer(
        self, call: KernelCall, params: Params, x1: Any, x2: Any, layers: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        """Layer name -> the layer's contribution J1_l·J2_lᵀ (``layers``: layer -> parameter
        names). By default one kernel per layer, differentiating that layer's parameters only."""
        restricted = lambda p, x: call.apply({**params, **p}, x)  # noqa: E731 - the other layers held fixed
        one_layer = KernelCall(call.backend, restricted, call.axes, call.out_shape, call.coupled)
        return {layer: self.kernel(one_layer, {n: params[n] for n in names}, x1, x2) for layer, names in layers.items()}

    def cost(self, shape: ModelShape, sizes: CallSizes, itemsize: int) -> Cost:
        """The predicted work of :meth:`kernel` on a model of ``shape`` at ``sizes``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<implementation {self.name!r}>"


def add_parts(total: Any, part: Any) -> Any:
    """Sum of two kernels, or of two per-layer maps of kernels (chunks of outputs summed)."""
    return {k: total[k] + part[k] for k in total} if isinstance(total, dict) else total + part
