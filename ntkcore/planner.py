"""What a kernel call runs and what it will cost: the cost model's estimates for the model's
sizes, ``auto``'s choice (cached; an implementation that raised on the model is skipped), the
memory-budget guard of an explicit implementation, the adapter's layer capture, and
``explain``'s account of all of it. One :class:`Planner` per prepared model."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from . import compiled, memory
from .arrays import device_of, itemsize
from .axes import KernelAxes
from .cost_model import constants, device_class, estimate, model_shape
from .explain import Explanation, MemoryBudgetError, budget_message, choose, describe_layers, format_bytes
from .implementations import REGISTRY, Implementation, Method
from .implementations.structured import StructuredFallbackWarning, plan
from .protocol import AutodiffBackend, Capture, PreparedModel
from .readout import Readout, Reduced, find


class AutoFallbackWarning(UserWarning):
    """An implementation ``auto`` chose raised on this model; the next best is used instead."""


def signature(backend: AutodiffBackend, params: Any) -> tuple:
    """The parameters' names, shapes and dtypes: what a model's probes and failures depend on."""
    return tuple((name, tuple(p.shape), backend.dtype_name(p)) for name, p in params.items())


def kernel_shape(x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> tuple[int, ...]:
    return axes.kernel_shape((x1.shape[0], *out_shape), ((x1 if x2 is None else x2).shape[0], *out_shape))


class Planner:
    """Estimates, choices and the capture for one prepared model and its options."""

    def __init__(
        self,
        backend: AutodiffBackend,
        prepared: PreparedModel,
        batch_independent: bool | None,
        memory_budget: Any,
        reduce_readout: bool | None = None,
        widened: Callable[[], PreparedModel] | None = None,
    ) -> None:
        self._backend, self._prepared, self._widened = backend, prepared, widened
        self._batch_independent, self._memory_budget = batch_independent, memory_budget
        self._reduce_readout = reduce_readout

    def budget(self) -> tuple[float | None, str]:
        """The memory budget in bytes (``None``: unknown, no limit) and where it comes from."""
        if self._memory_budget is not None:
            return self._memory_budget, "memory_budget="
        budget = memory.default_budget(self._backend, next(iter(self._prepared.params.values())))
        if budget is None:
            return None, "free memory unknown on this device: no limit"
        return budget, f"{memory.BUDGET_FRACTION:.0%} of the free memory"

    def _failed_key(self, x1: Any) -> tuple:
        """The model (its source object: torch makes a new ``apply`` per call) and input shape."""
        backend, prepared = self._backend, self._prepared
        model = prepared.apply if prepared.source is None else prepared.source
        try:
            hash(model)
        except TypeError:  # an equinox module hashes its arrays
            model = ("id", id(model))
        params = signature(backend, prepared.params)
        return (backend.name, model, params, tuple(x1.shape[1:]), backend.dtype_name(x1), self._batch_independent)

    def failed(self, x1: Any) -> dict[str, str]:
        """Implementations that raised on this model and input shape -> their error."""
        return compiled._FAILED.get(self._failed_key(x1), {})

    def exclude(self, method: Method, x1: Any, error: Exception) -> None:
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        failed = compiled.lookup(compiled._FAILED, self._failed_key(x1), dict)
        failed[method.name] = reason
        warnings.warn(
            f'implementation="{method.name}" cannot run on this model ({reason}); "auto" uses the next best',
            AutoFallbackWarning,
            stacklevel=4,
        )

    def check_budget(self, name: str, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> None:
        """An explicit implementation predicted to exceed the memory budget is refused: the
        operating system would kill the process."""
        budget, source = self.budget()
        if budget is None:
            return
        found = self.estimate_of(name, x1, x2, out_shape, axes)
        if found is None or found.peak_bytes <= budget:
            return
        shape = kernel_shape(x1, x2, out_shape, axes)
        raise MemoryBudgetError(
            f"implementation={name!r} is predicted to need {format_bytes(found.peak_bytes)} at its peak for a kernel "
            f"of shape {shape}, more than the memory budget of {format_bytes(budget)} ({source}); the operating "
            'system would kill the process. implementation="auto" chooses one that fits (or tiles the kernel); '
            "batch_size= computes the kernel tile by tile, out='kernel.zarr' writes it to disk; trace_axes=(-1,) "
            "sums over the output axis; or raise memory_budget= if the prediction is too cautious"
        )

    def estimate_of(self, name: str, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> Any:
        """The estimate of implementation ``name`` on these inputs (``None``: not a candidate), cached."""
        backend = self._backend
        key = (
            "estimate", name, backend.name, self._prepared.apply, tuple(x1.shape),
            None if x2 is None else tuple(x2.shape), backend.dtype_name(x1), out_shape, axes,
            self._batch_independent, self._reduce_readout,
        )  # fmt: skip
        return compiled.lookup(compiled._CHOICES, key, lambda: self.survey(x1, x2, out_shape, axes)[0].get(name))

    def method(self, name: str, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> Method:
        """Implementation ``name``, reduced to the model's readout where its estimate says so."""
        found = self.estimate_of(name, x1, x2, out_shape, axes)
        readout = self.readout(x1, out_shape) if found is not None and found.readout else None
        return REGISTRY[name] if readout is None else Reduced(REGISTRY[name], readout)

    def survey(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> tuple:
        """(every candidate's estimate, the model's sizes, the device class, why the methods
        that use the layer capture are not candidates — ``None`` when they are, the model's
        readout — ``None`` when it has none or it is not to be reduced)."""
        backend, prepared = self._backend, self._prepared
        like = next(iter(prepared.params.values()))
        capture = layers = None
        unavailable = "examples interact (batch_independent=False)" if self._batch_independent is False else None
        if unavailable is None:
            try:
                capture = self.capture(x1, warn=False)
                layers = plan(capture, prepared.params)
            except Exception as error:  # auto must not fail because one method cannot run
                capture, unavailable = None, f"the adapter cannot capture this model's layers: {error}"
        shape = model_shape(capture, prepared.params, layers)
        readout = None if capture is None else self.readout(x1, out_shape)
        priced = shape if readout is None else self._body_shape(capture, readout)
        device = device_class(device_of(like))
        table, size = constants(backend.name, device), itemsize(backend.dtype_name(like))
        n2 = None if x2 is None else x2.shape[0]
        failed = self.failed(x1)
        candidates = [
            name for name, m in REGISTRY.items() if (not m.uses_capture or capture is not None) and name not in failed
        ]
        estimates = {}
        for m in candidates:
            general = estimate(shape, m, x1.shape[0], n2, out_shape, axes, size, table)
            if readout is not None:  # the readout reduction where asked (True), or where predicted cheaper
                reduced = estimate(
                    priced, m, x1.shape[0], n2, out_shape, axes, size, table, Reduced(REGISTRY[m], readout)
                )
                general = reduced if self._reduce_readout or reduced.seconds < general.seconds else general
            estimates[m] = general
        return estimates, shape, device, unavailable, readout

    def _body_shape(self, capture: Capture, readout: Readout) -> Any:
        """The sizes of the model up to its readout's input h (what the implementations differentiate)."""
        body = readout.body_capture(capture)
        params = {n: p for n, p in self._prepared.params.items() if n not in readout.names}
        return model_shape(body, params, plan(body, params))

    def readout(self, x1: Any, out_shape: tuple[int, ...]) -> Readout | None:
        """The model's wide linear readout (:mod:`ntkcore.readout`), found once per model and
        input shape; ``None`` when it has none, or examples interact."""
        if self._batch_independent is False or self._reduce_readout is False:
            return None
        backend, prepared = self._backend, self._prepared
        key = ("readout", backend.name, prepared.apply, tuple(x1.shape[1:]), backend.dtype_name(x1), out_shape)

        def make() -> Readout | None:
            try:
                found = find(backend, self.capture(x1, warn=False), prepared.params, x1[:1], out_shape)
                return found if found is not None or self._widened is None else self._frozen_readout(x1, out_shape)
            except Exception:  # no capture, or a model the probes cannot run: the general path (exact)
                return None

        return compiled.lookup(compiled._CAPTURES, key, make)

    def _frozen_readout(self, x1: Any, out_shape: tuple[int, ...]) -> Readout | None:
        """A readout with frozen parameters: found in the capture of the model with every
        floating parameter as θ, those outside the kernel's θ held as constants."""
        widened = self._widened()
        frozen = frozenset(widened.params) - frozenset(self._prepared.params)
        if not frozen or not frozenset(self._prepared.params) <= frozenset(widened.params):
            return None
        capture = self._backend.capture(widened, x1[:1])
        return find(self._backend, capture, widened.params, x1[:1], out_shape, frozen)

    def auto_choice(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> str:
        """The cheapest predicted implementation that fits the budget, cached per shapes."""
        backend = self._backend
        key = (
            backend.name, self._prepared.apply, tuple(x1.shape), None if x2 is None else tuple(x2.shape),
            backend.dtype_name(x1), out_shape, axes, self._batch_independent, self._memory_budget,
            tuple(self.failed(x1)), self._reduce_readout,
        )  # fmt: skip
        return compiled.lookup(compiled._CHOICES, key, lambda: self._choose(x1, x2, out_shape, axes))

    def _choose(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> str:
        estimates = self.survey(x1, x2, out_shape, axes)[0]
        if not estimates and self.failed(x1):
            reasons = "; ".join(f"{name}: {why}" for name, why in self.failed(x1).items())
            raise RuntimeError(f"no implementation can run on this model: {reasons}")
        budget, source = self.budget()
        choice = choose(estimates, budget)
        if choice is None:
            shape = kernel_shape(x1, x2, out_shape, axes)
            raise MemoryBudgetError(budget_message(estimates, budget, source, shape))
        return choice

    def capture(self, x1: Any, *, warn: bool) -> Capture:
        """The adapter's layer capture for this model and input shape; with ``warn``, warns once
        about the parameters that take the exact fallback.

        Shared across calls through the identity of ``apply`` (like compiled kernels), so that
        repeated ``ntk()`` calls reuse both the capture and the kernel compiled with it.
        """
        backend = self._backend
        key = (backend.name, self._prepared.apply, tuple(x1.shape[1:]), backend.dtype_name(x1))
        entry = compiled.lookup(compiled._CAPTURES, key, lambda: [self._new_capture(x1), False])
        if warn and not entry[1]:
            entry[1] = True  # warned
            _, _, fallback, reasons = plan(entry[0], self._prepared.params)
            if fallback:
                warnings.warn(
                    f"structured derivatives: {'; '.join(reasons) or 'uncaptured parameters'}. Parameters "
                    f"{fallback} use the exact per-layer Jacobian contraction instead",
                    StructuredFallbackWarning,
                    stacklevel=4,
                )
        return entry[0]

    def _new_capture(self, x1: Any) -> Capture:
        try:
            return self._backend.capture(self._prepared, x1[:1])
        except NotImplementedError as error:
            needs = " / ".join(f'implementation="{name}"' for name, m in REGISTRY.items() if m.uses_capture)
            others = ", ".join(f'"{name}"' for name, m in REGISTRY.items() if not m.uses_capture)
            raise NotImplementedError(
                f'{needs} is not available for the {self._backend.name} backend yet ({error}); use {others} or "auto"'
            ) from None

    def explain(
        self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes, implementation: Any
    ) -> Explanation:
        """What a call on these (checked) inputs would do; see :meth:`ntkcore.kernel_fn.KernelFn.explain`."""
        estimates, shape, device, unavailable, readout = self.survey(x1, x2, out_shape, axes)
        budget, budget_source = self.budget()
        auto = implementation is Implementation.AUTO
        n2 = None if x2 is None else x2.shape[0]
        return Explanation(
            backend=self._backend.name,
            device=device,
            dtype=self._backend.dtype_name(x1),
            n1=x1.shape[0],
            n2=n2,
            out_shape=out_shape,
            kernel_shape=kernel_shape(x1, x2, out_shape, axes),
            choice=choose(estimates, budget) if auto else implementation.value,
            estimates=estimates,
            budget_bytes=budget,
            budget_source=budget_source,
            layers=describe_layers(shape, x1.shape[0], n2, out_shape, axes),
            structured_unavailable=unavailable,
            failed=dict(self.failed(x1)),
            readout=None if readout is None else readout.describe(),
        )
