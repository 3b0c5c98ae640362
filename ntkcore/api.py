"""Public entry points: resolve the backend for this call, check inputs, dispatch."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import cost_model, large_n, memory
from ._xp import namespace_of
from .algorithms import jacobian_contraction, ntk_vector_products, structured
from .algorithms._common import device_of, itemsize, layer_name
from .axes import KernelAxes
from .cost_model import Estimate, ModelShape
from .explain import Explanation, MemoryBudgetError, budget_message, choose, describe_layers
from .implementation import Implementation
from .protocol import AutodiffBackend, Capture, PreparedModel
from .registry import detect_backend, get_backend

Axes = int | Sequence[int]


class StructuredFallbackWarning(UserWarning):
    """Some parameters are computed by the exact per-layer fallback, not by a structure rule."""


_COMPILED: OrderedDict = OrderedDict()
_CAPTURES: OrderedDict = OrderedDict()  # -> [capture, whether its fallbacks were warned about]
_CHOICES: OrderedDict = OrderedDict()  # auto's choice per model, shapes and options
_COMPILED_SIZE = 64


def _build_compute(backend: AutodiffBackend, apply: Any, kind: str, key: tuple, capture: Capture | None) -> Callable:
    """The kernel computation for one set of static options (before compilation)."""
    _, out_shape, axes, coupled, impl, per_layer = key

    def compute(params: Mapping[str, Any], x1: Any, x2: Any = None) -> Any:
        if per_layer:
            return _per_layer(backend, apply, impl, capture, params, x1, x2, out_shape, axes, coupled)
        xp = backend.namespace(x1)
        shape1 = (x1.shape[0], *out_shape)
        shape2 = shape1 if x2 is None else (x2.shape[0], *out_shape)
        if kind == "nngp":
            f1 = {"f": apply(params, x1)[..., None]}
            f2 = f1 if x2 is None else {"f": apply(params, x2)[..., None]}
            return jacobian_contraction.contract(xp, f1, f2, axes, shape1, shape2)
        if impl is Implementation.STRUCTURED:
            return structured.kernel(backend, capture, params, x1, x2, axes, out_shape)
        if impl is Implementation.NTK_VECTOR_PRODUCTS:
            x2_ = x1 if x2 is None else x2
            return ntk_vector_products.kernel(backend, apply, params, x1, x2_, axes, out_shape, coupled=coupled)
        j1 = jacobian_contraction.jacobians(backend, apply, params, x1, out_shape, coupled=coupled)
        j2 = (
            j1 if x2 is None else jacobian_contraction.jacobians(backend, apply, params, x2, out_shape, coupled=coupled)
        )
        return jacobian_contraction.contract(xp, j1, j2, axes, shape1, shape2)

    return compute


def _compiled_kernel(
    backend: AutodiffBackend, apply: Any, kind: str, key: tuple, capture: Capture | None = None
) -> Callable:
    """The compiled kernel for this ``apply`` and options, shared by every call that has them.

    Keyed by the identity of ``apply``: adapters that return the same ``apply`` for the same
    model (and constants) let repeated ``ntk()`` calls skip recompilation. Parameters and
    inputs are arguments of the compiled function, never baked in.
    """
    cache_key = (backend.name, apply, kind, key, capture)
    if cache_key in _COMPILED:
        _COMPILED.move_to_end(cache_key)
    else:
        _COMPILED[cache_key] = backend.jit(_build_compute(backend, apply, kind, key, capture))
        while len(_COMPILED) > _COMPILED_SIZE:
            _COMPILED.popitem(last=False)
    return _COMPILED[cache_key]


def _layers_of(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """Layer name -> its parameter names, in parameter order (see ``layer_name``)."""
    layers: dict[str, list[str]] = {}
    for name in params:
        layers.setdefault(layer_name(name), []).append(name)
    return layers


def _per_layer(
    backend: AutodiffBackend,
    apply: Any,
    impl: Implementation,
    capture: Capture | None,
    params: Mapping[str, Any],
    x1: Any,
    x2: Any,
    out_shape: tuple[int, ...],
    axes: KernelAxes,
    coupled: bool,
) -> dict[str, Any]:
    """Layer name -> the layer's contribution J1_l·J2_lᵀ (they sum to the kernel).

    Structured derivatives and Jacobian contraction get them from the same pieces as the whole
    kernel; NTK-vector products run once per layer, differentiating that layer's parameters only.
    """
    xp = backend.namespace(x1)
    layers = _layers_of(params)
    if impl is Implementation.STRUCTURED:
        parts = structured.kernel(backend, capture, params, x1, x2, axes, out_shape, layer_of=layer_name)
        return {layer: parts[layer] for layer in layers}
    if impl is Implementation.NTK_VECTOR_PRODUCTS:
        x2_ = x1 if x2 is None else x2
        parts = {}
        for layer, names in layers.items():
            own = {n: params[n] for n in names}
            restricted = lambda p, x: apply({**params, **p}, x)  # noqa: E731 - the other layers held fixed
            parts[layer] = ntk_vector_products.kernel(
                backend, restricted, own, x1, x2_, axes, out_shape, coupled=coupled
            )
        return parts
    j1 = jacobian_contraction.jacobians(backend, apply, params, x1, out_shape, coupled=coupled)
    j2 = j1 if x2 is None else jacobian_contraction.jacobians(backend, apply, params, x2, out_shape, coupled=coupled)
    shape1 = (x1.shape[0], *out_shape)
    shape2 = shape1 if x2 is None else (x2.shape[0], *out_shape)
    return {
        layer: jacobian_contraction.contract(
            xp, {n: j1[n] for n in names}, {n: j2[n] for n in names}, axes, shape1, shape2
        )
        for layer, names in layers.items()
    }


class KernelFn:
    """A reusable ``kernel(x1, x2=None)`` for one model; see :func:`ntk_fn`.

    The backend and the prepared model are resolved on first use (so a JAX function whose
    framework shows only in its inputs works too); compiled kernels are cached per output
    shape, axes and x2-reuse, and the framework's compiler caches per input shape.
    """

    def __init__(
        self,
        model: Any,
        *,
        params: Any,
        implementation: Any,
        trace_axes: Axes,
        diagonal_axes: Axes,
        backend: str | None,
        batch_independent: bool | None,
        kind: str,
        memory_budget: Any = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        executor: Any = None,
        per_layer: bool = False,
    ) -> None:
        self._model, self._params = model, params
        if per_layer not in (True, False):
            raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
        if per_layer and (batch_size is not None or executor is not None):
            raise ValueError(
                "per_layer=True returns the layers' kernels in memory: it cannot be tiled "
                "(batch_size=) or distributed (executor=)"
            )
        self._per_layer = per_layer
        self._implementation = Implementation.parse(implementation)
        self._memory_budget = memory.parse_budget(memory_budget)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive number of examples per tile, got {batch_size!r}")
        self._batch_size, self._progress, self._executor = batch_size, progress, executor
        self._backend_name = backend
        if batch_independent not in (None, True, False):
            raise TypeError(f"batch_independent must be None, True or False, got {batch_independent!r}")
        self._axes_args = (trace_axes, diagonal_axes)
        self._batch_independent = batch_independent
        self._kind = kind
        self._backend: AutodiffBackend | None = get_backend(backend) if backend is not None else None
        self._prepared: PreparedModel | None = None
        self._out_shapes: dict[tuple, tuple[int, ...]] = {}
        if self._backend is not None:
            self._prepare()

    # -- set-up ---------------------------------------------------------------------------
    def _prepare(self, arrays: tuple[Any, ...] = ()) -> None:
        if self._backend is None:
            self._backend = detect_backend(self._model, self._params, arrays)
        prepared = self._backend.prepare(self._model, self._params)
        if self._kind == "ntk" and not prepared.params:
            raise ValueError(
                "model has no trainable parameters: the NTK is taken with respect to trainable "
                "parameters (torch requires_grad=True, Keras/TF trainable variables, JAX params=)"
            )
        if prepared.batch_coupled and self._batch_independent is None:
            raise ValueError(
                f"model: {prepared.batch_coupled} makes examples in a batch interact, so the "
                "per-example kernel would be wrong. Put the model in inference mode (e.g. "
                "model.eval()), or pass batch_independent=False to compute the exact kernel of "
                "the batch as a whole."
            )
        self._prepared = prepared

    @property
    def backend(self) -> AutodiffBackend | None:
        """The resolved adapter (``None`` until it can be inferred)."""
        return self._backend

    # -- the call -------------------------------------------------------------------------
    def __call__(self, x1: Any, x2: Any = None, *, out: Any = None, overwrite: bool = False) -> Any:
        """The kernel between ``x1`` and ``x2`` (``x2=None`` reuses x1's work).

        With ``batch_size``, ``out`` (a ``.zarr`` or ``.npy`` path: written tile by tile,
        resumable, returned opened read-only) or an ``executor``, or when ``"auto"`` finds that
        the whole kernel at once does not fit the memory budget, it is computed tile by tile
        (:mod:`ntkcore.large_n`).
        """
        x1, x2, out_shape, axes = self._resolve(x1, x2)
        if self._per_layer:
            if out is not None:
                raise ValueError("per_layer=True returns the layers' kernels in memory: out= is not supported")
            return self._untiled(x1, x2, out_shape, axes)
        size = self._batch_size
        if size is None and (out is not None or self._executor is not None or not self._fits(x1, x2, out_shape, axes)):
            size = large_n.tile_size(self, x1, x2, out_shape, axes, on_disk=out is not None)
        if size is None:
            return self._untiled(x1, x2, out_shape, axes)
        return large_n.compute(
            self,
            x1,
            x2,
            out_shape,
            axes,
            batch_size=size,
            out=out,
            overwrite=overwrite,
            progress=self._progress,
            executor=self._executor,
        )

    def _fits(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> bool:
        """Whether the whole kernel can be computed at once (``"auto"``: some method fits the
        budget; an explicit implementation is always run as asked)."""
        if self._kind == "nngp" or self._implementation is not Implementation.AUTO:
            return True
        try:
            self._auto_choice(x1, x2, out_shape, axes)
        except MemoryBudgetError:
            return False
        return True

    def _untiled(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> Any:
        """The kernel in one computation, on checked inputs."""
        backend, prepared = self._backend, self._prepared
        coupled = self._batch_independent is False
        impl = self._implementation
        if self._kind == "nngp":
            impl = Implementation.JACOBIAN_CONTRACTION
        elif impl is Implementation.AUTO:
            impl = Implementation(self._auto_choice(x1, x2, out_shape, axes))
        if impl is Implementation.STRUCTURED and coupled:
            warnings.warn(
                "structured derivatives assume independent examples; with batch_independent=False the "
                "kernel is computed by Jacobian contraction",
                StructuredFallbackWarning,
                stacklevel=3,
            )
            impl = Implementation.JACOBIAN_CONTRACTION
        capture = self._capture(x1, warn=True) if impl is Implementation.STRUCTURED else None
        key = (x2 is None, out_shape, axes, coupled, impl, self._per_layer)
        compiled = _compiled_kernel(backend, prepared.apply, self._kind, key, capture)
        return compiled(prepared.params, x1) if x2 is None else compiled(prepared.params, x1, x2)

    def explain(self, x1: Any, x2: Any = None) -> Explanation:
        """What a call on these inputs would do, predicted with nothing computed or compiled:
        FLOPs, peak bytes and time of every implementation, the choice, each layer's rule."""
        x1, x2, out_shape, axes = self._resolve(x1, x2)
        estimates, shape, device, unavailable = self._estimates(x1, x2, out_shape, axes)
        budget, budget_source = self._budget()
        auto = self._implementation is Implementation.AUTO
        choice = choose(estimates, budget) if auto else self._implementation.value
        n2 = None if x2 is None else x2.shape[0]
        return Explanation(
            backend=self._backend.name,
            device=device,
            dtype=self._backend.dtype_name(x1),
            n1=x1.shape[0],
            n2=n2,
            out_shape=out_shape,
            kernel_shape=self._kernel_shape(x1, x2, out_shape, axes),
            choice=choice,
            estimates=estimates,
            budget_bytes=budget,
            budget_source=budget_source,
            layers=describe_layers(shape, x1.shape[0], n2, out_shape, axes),
            structured_unavailable=unavailable,
        )

    def _resolve(self, x1: Any, x2: Any) -> tuple[Any, Any, tuple[int, ...], KernelAxes]:
        """Prepare the model on first use and check the inputs; returns them converted, with
        f's per-example output shape and the validated axes."""
        if self._prepared is None:
            self._prepare(tuple(a for a in (x1, x2) if a is not None))
        backend, prepared = self._backend, self._prepared
        like = next(iter(prepared.params.values()), None)
        x1 = self._check_input("x1", x1, backend, prepared, like)
        if x2 is not None:
            x2 = self._check_input("x2", x2, backend, prepared, like)
            if tuple(x2.shape[1:]) != tuple(x1.shape[1:]):
                raise ValueError(
                    f"x2 has per-example shape {tuple(x2.shape[1:])} but x1 has {tuple(x1.shape[1:])}; "
                    "both batches must have the same shape apart from the batch axis 0"
                )
        out_shape = self._output_shape(x1, self._batch_independent is False)
        axes = KernelAxes.create(*self._axes_args, (x1.shape[0], *out_shape))
        if x2 is not None and 0 in axes.diagonal and x2.shape[0] != x1.shape[0]:
            raise ValueError(
                f"diagonal_axes contains the batch axis 0, which pairs x1[i] with x2[i], but x1 has "
                f"{x1.shape[0]} examples and x2 has {x2.shape[0]}"
            )
        return x1, x2, out_shape, axes

    def _estimates(
        self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes
    ) -> tuple[dict[str, Estimate], ModelShape, str, str | None]:
        """Every candidate implementation's predicted cost, the model's sizes, the device class,
        and why structured derivatives are not a candidate (``None`` when they are)."""
        backend, prepared = self._backend, self._prepared
        like = next(iter(prepared.params.values()))
        capture = plan = None
        unavailable = "examples interact (batch_independent=False)" if self._batch_independent is False else None
        if unavailable is None:
            try:
                capture = self._capture(x1, warn=False)
                plan = structured.plan(capture, prepared.params)
            except Exception as error:  # auto must not fail because one method cannot run
                capture, unavailable = None, f"the adapter cannot capture this model's layers: {error}"
        shape = cost_model.model_shape(capture, prepared.params, plan)
        device = cost_model.device_class(device_of(like))
        constants = cost_model.constants(backend.name, device)
        size = itemsize(backend.dtype_name(like))
        n2 = None if x2 is None else x2.shape[0]
        methods = [m for m in cost_model.METHODS if m != "structured" or capture is not None]
        estimates = {
            m: cost_model.estimate(shape, m, x1.shape[0], n2, out_shape, axes, size, constants) for m in methods
        }
        return estimates, shape, device, unavailable

    def _spec(self) -> dict:
        """The arguments that rebuild this kernel function in another process (a Dask worker)."""
        return {
            "model": self._model,
            "params": self._params,
            "implementation": self._implementation,
            "trace_axes": self._axes_args[0],
            "diagonal_axes": self._axes_args[1],
            "backend": self._backend.name if self._backend is not None else self._backend_name,
            "batch_independent": self._batch_independent,
            "kind": self._kind,
            "memory_budget": self._memory_budget,
        }

    def _options(self, batch_size: int) -> dict:
        """What a stored kernel depends on besides parameters and inputs (its fingerprint)."""
        trace, diagonal = self._axes_args
        return {
            "kind": self._kind,
            "backend": self._backend.name,
            "implementation": self._implementation.value,
            "trace_axes": repr(trace),
            "diagonal_axes": repr(diagonal),
            "batch_independent": self._batch_independent,
            "batch_size": batch_size,
        }

    def _dtype_name(self) -> str:
        return self._backend.dtype_name(next(iter(self._prepared.params.values())))

    def _itemsize(self) -> int:
        return itemsize(self._dtype_name())

    def _budget(self) -> tuple[float | None, str]:
        """The memory budget in bytes (``None``: unknown, no limit) and where it comes from."""
        if self._memory_budget is not None:
            return self._memory_budget, "memory_budget="
        like = next(iter(self._prepared.params.values()))
        budget = memory.default_budget(self._backend, like)
        if budget is None:
            return None, "free memory unknown on this device: no limit"
        return budget, f"{memory.BUDGET_FRACTION:.0%} of the free memory"

    def _auto_choice(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> str:
        """The cheapest predicted implementation that fits the budget, cached per shapes."""
        backend, prepared = self._backend, self._prepared
        key = (
            backend.name,
            prepared.apply,
            tuple(x1.shape),
            None if x2 is None else tuple(x2.shape),
            backend.dtype_name(x1),
            out_shape,
            axes,
            self._batch_independent,
            self._memory_budget,
        )
        if key in _CHOICES:
            _CHOICES.move_to_end(key)
            return _CHOICES[key]
        estimates = self._estimates(x1, x2, out_shape, axes)[0]
        budget, source = self._budget()
        choice = choose(estimates, budget)
        if choice is None:
            shape = self._kernel_shape(x1, x2, out_shape, axes)
            raise MemoryBudgetError(budget_message(estimates, budget, source, shape))
        _CHOICES[key] = choice
        while len(_CHOICES) > _COMPILED_SIZE:
            _CHOICES.popitem(last=False)
        return choice

    @staticmethod
    def _kernel_shape(x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> tuple[int, ...]:
        return axes.kernel_shape((x1.shape[0], *out_shape), ((x1 if x2 is None else x2).shape[0], *out_shape))

    def _capture(self, x1: Any, *, warn: bool) -> Capture:
        """The adapter's layer capture for this model and input shape; with ``warn``, warns once
        about the parameters that take the exact fallback.

        Shared across calls through the identity of ``apply`` (like compiled kernels), so that
        repeated ``ntk()`` calls reuse both the capture and the kernel compiled with it.
        """
        key = (self._backend.name, self._prepared.apply, tuple(x1.shape[1:]), self._backend.dtype_name(x1))
        if key in _CAPTURES:
            _CAPTURES.move_to_end(key)
        else:
            try:
                _CAPTURES[key] = [self._backend.capture(self._prepared, x1[:1]), False]
            except NotImplementedError as error:
                raise NotImplementedError(
                    f'implementation="structured" is not available for the {self._backend.name} backend yet '
                    f'({error}); use "jacobian_contraction", "ntk_vector_products" or "auto"'
                ) from None
            while len(_CAPTURES) > _COMPILED_SIZE:
                _CAPTURES.popitem(last=False)
        entry = _CAPTURES[key]
        if warn and not entry[1]:
            entry[1] = True  # warned
            _, _, fallback, reasons = structured.plan(entry[0], self._prepared.params)
            if fallback:
                warnings.warn(
                    f"structured derivatives: {'; '.join(reasons) or 'uncaptured parameters'}. Parameters "
                    f"{fallback} use the exact per-layer Jacobian contraction instead",
                    StructuredFallbackWarning,
                    stacklevel=4,
                )
        return entry[0]

    def _output_shape(self, x1: Any, coupled: bool) -> tuple[int, ...]:
        """f's per-example output shape, from one forward pass per input shape and dtype."""
        backend, prepared = self._backend, self._prepared
        key = (tuple(x1.shape[1:]), backend.dtype_name(x1), x1.shape[0] if coupled else None)
        if key not in self._out_shapes:
            probe = prepared.apply(prepared.params, x1 if coupled else x1[:1])
            if not backend.is_floating(probe):
                raise TypeError(f"model output must be floating point, got dtype {backend.dtype_name(probe)}")
            if len(probe.shape) == 0 or probe.shape[0] != (x1.shape[0] if coupled else 1):
                raise ValueError(
                    f"model output of shape {tuple(probe.shape)} has no leading batch axis matching x1's "
                    f"{x1.shape[0]} examples; f(params, x) must map (N, ...) to (N, *out)"
                )
            self._out_shapes[key] = tuple(int(d) for d in probe.shape[1:])
        return self._out_shapes[key]

    @staticmethod
    def _check_input(name: str, x: Any, backend: AutodiffBackend, prepared: PreparedModel, like: Any) -> Any:
        if like is not None:
            try:
                x = backend.asarray(x, like=like)
            except TypeError as error:
                raise TypeError(f"{name}: {error}") from None
        if len(x.shape) == 0:
            raise ValueError(f"{name} must have a leading batch axis, got a scalar")
        if not backend.is_floating(x) and not prepared.accepts_integer_inputs(x):
            raise TypeError(
                f"{name} has dtype {backend.dtype_name(x)} but the model takes floating-point inputs "
                f"(it has no embedding that consumes integer ids); cast {name} to the parameters' "
                f"dtype {backend.dtype_name(like) if like is not None else ''}".rstrip()
            )
        return x


def ntk_fn(
    model: Any,
    *,
    params: Any = None,
    implementation: Implementation | str = "auto",
    trace_axes: Axes = (),
    diagonal_axes: Axes = (),
    backend: str | None = None,
    batch_independent: bool | None = None,
    memory_budget: float | str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    executor: Any = None,
    per_layer: bool = False,
) -> KernelFn:
    """A reusable ``kernel(x1, x2=None)`` computing the empirical NTK of ``model``.

    Compiles and caches what its framework can (``jax.jit``, ``tf.function``). Options are
    those of :func:`ntk`; ``kernel.explain(x1, x2)`` predicts what a call would do.
    """
    return KernelFn(
        model,
        params=params,
        implementation=implementation,
        trace_axes=trace_axes,
        diagonal_axes=diagonal_axes,
        backend=backend,
        batch_independent=batch_independent,
        kind="ntk",
        memory_budget=memory_budget,
        batch_size=batch_size,
        progress=progress,
        executor=executor,
        per_layer=per_layer,
    )


def ntk(
    model: Any,
    x1: Any,
    x2: Any = None,
    *,
    params: Any = None,
    implementation: Implementation | str = "auto",
    trace_axes: Axes = (),
    diagonal_axes: Axes = (),
    backend: str | None = None,
    batch_independent: bool | None = None,
    memory_budget: float | str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    executor: Any = None,
    out: Any = None,
    overwrite: bool = False,
    per_layer: bool = False,
) -> Any:
    """The empirical NTK Θ(x1, x2) = J(x1)·J(x2)ᵀ, J = ∂f/∂θ over trainable parameters θ.

    Args:
        model: a torch ``nn.Module``, a Keras 3 model or ``tf.Module``, or a JAX function
            ``f(params, x)`` (an equinox module may be passed directly).
        x1, x2: batches of shape (N1, ...) and (N2, ...); ``x2=None`` means x1 (work reused).
        params: the parameters of a JAX function (any pytree); for torch/Keras, optional
            replacement values for the trainable parameters (a ``name -> array`` map).
        implementation: ``"auto"`` (default: the cheapest the cost model predicts that fits
            the memory budget, see :func:`explain`), ``"jacobian_contraction"``,
            ``"ntk_vector_products"`` or ``"structured"``.
        trace_axes: output axes summed over their pair (a true trace), dropped from the shape.
        diagonal_axes: output axes of which only the diagonal is kept, appearing once.
        backend: ``"jax"``, ``"torch"``, ``"tensorflow"`` or a plugin; inferred if ``None``.
        batch_independent: ``None`` (default) checks that examples do not interact;
            ``False`` computes the exact kernel of a batch whose examples interact.
        memory_budget: bytes (or a string like ``"4GB"``) ``"auto"`` may use; default half of
            the free memory of the device (host RAM on a CPU).
        batch_size: examples per tile: the kernel is computed tile by tile (x2=None: only
            the tiles on and above the diagonal). Chosen from the memory budget when not given
            and the whole kernel would not fit.
        progress: a progress bar over tiles: ``None`` (default) on a terminal only.
        executor: a ``dask.distributed.Client`` or a scheduler address: tiles run as Dask tasks.
        out: a ``.zarr`` (zarr v3) or ``.npy`` path: the kernel is written there tile by tile
            and returned opened read-only; rerunning the same call resumes an interrupted job.
        overwrite: replace an ``out`` that holds a kernel of other parameters, inputs or options.
        per_layer: return a map layer name -> that layer's contribution J1_l·J2_lᵀ (they sum to
            the kernel). A layer is a parameter name up to its last ``.`` or ``/`` (torch
            ``"fc1"`` for ``"fc1.weight"``), or the parameter itself. Structured derivatives
            and Jacobian contraction give them at the cost of the kernel; NTK-vector products
            take one pass per layer. Not with tiling (``batch_size``, ``out``, ``executor``).

    Returns:
        An array of the model's framework, dtype and device, of shape (N1, N2, *out, *out)
        before trace/diagonal reductions (see :mod:`ntkcore.axes`); with ``per_layer``, a
        dict of such arrays.
    """
    fn = ntk_fn(
        model,
        params=params,
        implementation=implementation,
        trace_axes=trace_axes,
        diagonal_axes=diagonal_axes,
        backend=backend,
        batch_independent=batch_independent,
        memory_budget=memory_budget,
        batch_size=batch_size,
        progress=progress,
        executor=executor,
        per_layer=per_layer,
    )
    return fn(x1, x2, out=out, overwrite=overwrite)


def explain(
    model: Any,
    x1: Any,
    x2: Any = None,
    *,
    params: Any = None,
    implementation: Implementation | str = "auto",
    trace_axes: Axes = (),
    diagonal_axes: Axes = (),
    backend: str | None = None,
    batch_independent: bool | None = None,
    memory_budget: float | str | None = None,
) -> Explanation:
    """What :func:`ntk` would do with the same arguments, without computing or compiling it.

    Returns an :class:`~ntkcore.explain.Explanation`: ``.choice`` (the implementation a call
    would use; ``None`` when none fits the memory budget), ``.estimates`` (per implementation:
    predicted FLOPs, peak bytes and seconds), ``.layers`` (each layer's structure rule or
    fallback); ``str()`` of it is a readable table.
    """
    fn = ntk_fn(
        model,
        params=params,
        implementation=implementation,
        trace_axes=trace_axes,
        diagonal_axes=diagonal_axes,
        backend=backend,
        batch_independent=batch_independent,
        memory_budget=memory_budget,
    )
    return fn.explain(x1, x2)


def nngp(
    model: Any,
    x1: Any,
    x2: Any = None,
    *,
    params: Any = None,
    trace_axes: Axes = (),
    diagonal_axes: Axes = (),
    backend: str | None = None,
    batch_independent: bool | None = None,
    batch_size: int | None = None,
    out: Any = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Any:
    """The empirical NNGP kernel f(x1)·f(x2)ᵀ, with the axis conventions of :func:`ntk`."""
    fn = KernelFn(
        model,
        params=params,
        implementation=Implementation.JACOBIAN_CONTRACTION,
        trace_axes=trace_axes,
        diagonal_axes=diagonal_axes,
        backend=backend,
        batch_independent=batch_independent,
        kind="nngp",
        batch_size=batch_size,
        progress=progress,
    )
    return fn(x1, x2, out=out, overwrite=overwrite)


def ntk_from_jacobians(
    jac1: Mapping[str, Any],
    jac2: Mapping[str, Any] | None = None,
    *,
    output_ndim: int,
    trace_axes: Axes = (),
    diagonal_axes: Axes = (),
) -> Any:
    """Contract explicit Jacobians ``name -> (N, *out, *param.shape)`` into the NTK.

    ``output_ndim`` is the number of axes of f's output, batch axis included. Works on any
    array-API library (numpy included), with no framework imported.
    """
    if not jac1:
        raise ValueError("jac1 is empty: expected a map name -> Jacobian array")
    jac2 = jac1 if jac2 is None else jac2
    if set(jac1) != set(jac2):
        raise ValueError(f"jac1 and jac2 must have the same parameter names, got {sorted(jac1)} and {sorted(jac2)}")
    first1, first2 = next(iter(jac1.values())), jac2[next(iter(jac1))]
    shape1, shape2 = tuple(first1.shape[:output_ndim]), tuple(first2.shape[:output_ndim])
    for name in jac1:
        for label, jac, shape in (("jac1", jac1[name], shape1), ("jac2", jac2[name], shape2)):
            if tuple(jac.shape[:output_ndim]) != shape:
                raise ValueError(f"{label}[{name!r}] has shape {tuple(jac.shape)}, expected a leading {shape}")
        if tuple(jac1[name].shape[output_ndim:]) != tuple(jac2[name].shape[output_ndim:]):
            raise ValueError(f"jac1[{name!r}] and jac2[{name!r}] differ in their parameter axes")
    if shape1[1:] != shape2[1:]:
        raise ValueError(f"jac2 has output shape {shape2[1:]} but jac1 has {shape1[1:]}")
    axes = KernelAxes.create(trace_axes, diagonal_axes, shape1)
    if 0 in axes.diagonal and shape1[0] != shape2[0]:
        raise ValueError(
            f"diagonal_axes=(0, ...) needs as many examples in jac2 ({shape2[0]}) as in jac1 ({shape1[0]})"
        )
    xp = namespace_of(*jac1.values(), *jac2.values())
    return jacobian_contraction.contract(xp, jac1, jac2, axes, shape1, shape2)


def flatten(kernel: Any) -> Any:
    """The (N1·O, N2·O) matrix of a kernel of shape (N1, N2, *out, *out).

    Traced axes may have been dropped; diagonal axes may not (the result must be a matrix
    over examples × outputs of each side).
    """
    xp = namespace_of(kernel)
    ndim = len(kernel.shape)
    if ndim < 2 or ndim % 2:
        raise ValueError(
            f"kernel of shape {tuple(kernel.shape)} is not (N1, N2, *out, *out); flatten needs a "
            "kernel computed without diagonal_axes"
        )
    k = (ndim - 2) // 2
    if tuple(kernel.shape[2 : 2 + k]) != tuple(kernel.shape[2 + k :]):
        raise ValueError(f"kernel of shape {tuple(kernel.shape)} has different output axes on its two sides")
    order = (0, *range(2, 2 + k), 1, *range(2 + k, ndim))
    rows = kernel.shape[0] * math.prod(kernel.shape[2 : 2 + k])
    cols = kernel.shape[1] * math.prod(kernel.shape[2 + k :])
    return xp.reshape(xp.permute_dims(kernel, order), (rows, cols))
