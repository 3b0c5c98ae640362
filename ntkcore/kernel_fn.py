"""``KernelFn``: one model's reusable kernel. It resolves the backend and prepares the model on
first use, checks inputs, lets ``auto`` choose, and runs the chosen implementation compiled (or
tile by tile, :mod:`ntkcore.large_n`, through the small public interface below)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from . import compiled, large_n, memory
from . import model_kwargs as arguments
from .arrays import itemsize
from .axes import KernelAxes
from .cost_model import Estimate
from .explain import Explanation, MemoryBudgetError
from .implementations import REGISTRY, Implementation, KernelCall, Method, Sketch
from .implementations.structured import StructuredFallbackWarning
from .inputs import all_finite, check_independent, check_pair, first_nonfinite, output_shape
from .outputs import StructuredOutput, check_output, rebuild, selected_apply
from .planner import Planner, signature
from .protocol import AutodiffBackend, PreparedModel
from .registry import detect_backend, get_backend

Resolved = tuple[Any, Any, tuple[int, ...], KernelAxes]  # x1, x2, per-example output shape, axes


def _check_options(
    per_layer: Any, batch_size: Any, executor: Any, batch_independent: Any, check_finite: Any, trainable: Any
) -> None:
    for name, value in (("per_layer", per_layer), ("check_finite", check_finite)):
        if value not in (True, False):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if per_layer and (batch_size is not None or executor is not None):
        raise ValueError(
            "per_layer=True returns the layers' kernels in memory: it cannot be tiled "
            "(batch_size=) or distributed (executor=)"
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive number of examples per tile, got {batch_size!r}")
    if batch_independent not in (None, True, False):
        raise TypeError(f"batch_independent must be None, True or False, got {batch_independent!r}")
    if trainable is not None and not callable(trainable):
        raise TypeError(f"trainable must be None or a predicate on parameter names, got {trainable!r}")


def _check_sketch(
    implementation: Implementation, sketch: Sketch | None, per_layer: bool, batch_independent: bool | None
) -> Sketch | None:
    """The sketch's options go with ``implementation="sketch"`` and only with it."""
    if implementation is not Implementation.SKETCH:
        if sketch is not None:
            raise ValueError('sketch_dim= and seed= set the sketch of implementation="sketch"; pass that too')
        return None
    if sketch is None:
        raise ValueError('implementation="sketch" needs sketch_dim= (random projections, e.g. 256)')
    if per_layer:
        raise ValueError('per_layer=True takes an exact implementation, not implementation="sketch"')
    if sketch.kronecker and batch_independent is False:
        raise ValueError(
            "sketch_kronecker=True takes each example's layer inputs and cotangents, which a batch whose "
            "examples interact does not have; with batch_independent=False use the plain sketch"
        )
    return sketch


def _probe(backend: AutodiffBackend, apply: Any) -> Any:
    """``apply`` compiled for the input probes (once per model and shape, shared across calls);
    where compiling fails (an output object, an error in the model), ``apply`` itself runs, so
    the probe sees what the model really returns or raises."""

    def make() -> Any:
        jitted = backend.jit(apply)

        def probe(params: Any, x: Any) -> Any:
            try:
                return jitted(params, x)
            except Exception:
                return apply(params, x)

        return probe

    return compiled.lookup(compiled._COMPILED, ("probe", backend.name, apply), make)


class KernelFn:
    """A reusable ``kernel(x1, x2=None)`` for one model; see :func:`ntkcore.ntk_fn`.

    The backend and the prepared model are resolved on first use (so a JAX function whose
    framework shows only in its inputs works too); compiled kernels are cached per output
    shape, axes and x2-reuse, and the framework's compiler caches per input shape.
    """

    def __init__(
        self,
        model: Any,
        *,
        params: Any = None,
        implementation: Any = "auto",
        trace_axes: Any = (),
        diagonal_axes: Any = (),
        backend: str | None = None,
        batch_independent: bool | None = None,
        kind: str = "ntk",
        memory_budget: Any = None,
        batch_size: int | None = None,
        progress: bool | None = None,
        executor: Any = None,
        per_layer: bool = False,
        check_finite: bool = True,
        output: Any = None,
        trainable: Any = None,
        state: Any = None,
        reduce_readout: bool | None = None,
        sketch: Sketch | None = None,
        model_arguments: tuple | None = None,
    ) -> None:
        _check_options(per_layer, batch_size, executor, batch_independent, check_finite, trainable)
        if reduce_readout not in (None, True, False):
            raise TypeError(f"reduce_readout must be None, True or False, got {reduce_readout!r}")
        check_output(output)
        self._model, self._params, self._kind = model, params, kind
        self._output, self._trainable, self._state, self._check_finite = output, trainable, state, check_finite
        self._implementation = Implementation.parse(implementation)
        self._sketch = _check_sketch(self._implementation, sketch, per_layer, batch_independent)
        self._memory_budget = memory.parse_budget(memory_budget)
        self._batch_size, self._progress, self._executor, self._per_layer = batch_size, progress, executor, per_layer
        self._backend_name, self._batch_independent = backend, batch_independent
        self._reduce_readout = reduce_readout
        self._arguments = model_arguments  # (shared kwargs, packed Layout): set on the KernelFn of one model_kwargs=
        self._children: dict = {}
        self._axes_args = (trace_axes, diagonal_axes)
        self._backend: AutodiffBackend | None = get_backend(backend) if backend is not None else None
        self._prepared: PreparedModel | None = None
        if self._backend is not None:
            self._prepare()

    def _prepare(self, arrays: tuple[Any, ...] = ()) -> None:
        if self._backend is None:
            self._backend = detect_backend(self._model, self._params, arrays)
        extra = {"trainable": self._trainable, "state": self._state}
        extra = {k: v for k, v in extra.items() if v is not None}  # only what the user gave: plugins may not take them
        prepared = self._backend.prepare(self._model, self._params, **extra)
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
        self._prepared = prepared = self._wrapped(prepared)
        self._planner = Planner(
            self._backend, prepared, self._batch_independent, self._memory_budget, self._reduce_readout, self._widened
        )

    def _wrapped(self, prepared: PreparedModel) -> PreparedModel:
        """``prepared`` with the call's model keyword arguments and output selection applied."""
        if self._arguments is not None:
            shared, layout = self._arguments
            apply = prepared.apply
            if shared is not None:
                native = arguments.native_shared(self._backend, shared, next(iter(prepared.params.values())))
                apply = arguments.shared_apply(apply, native, arguments.identity(shared))
            apply = apply if layout is None else arguments.packed_apply(apply, layout)
            prepared = dataclasses.replace(prepared, apply=apply)
        if self._output is not None:
            prepared = dataclasses.replace(prepared, apply=selected_apply(prepared.apply, self._output))
        return prepared

    def _widened(self) -> PreparedModel:
        """The model prepared with every floating parameter as θ: where the readout reduction
        looks for a frozen readout (its frozen parameters are then constants of the kernel)."""
        extra = {"state": self._state} if self._state is not None else {}
        return self._wrapped(self._backend.prepare(self._model, self._params, trainable=lambda name: True, **extra))

    # -- the interface of the tiled path and the operators ----------------------------------
    @property
    def backend(self) -> AutodiffBackend | None:
        """The resolved adapter (``None`` until it can be inferred)."""
        return self._backend

    @property
    def prepared(self) -> PreparedModel | None:
        """The prepared model (``None`` until the backend is resolved)."""
        return self._prepared

    @property
    def dtype_name(self) -> str:
        """The parameters' dtype, as the adapter names it."""
        return self._backend.dtype_name(next(iter(self._prepared.params.values())))

    @property
    def itemsize(self) -> int:
        """Bytes per kernel entry."""
        return itemsize(self.dtype_name)

    def resolve(self, x1: Any, x2: Any) -> Resolved:
        """Prepare the model on first use and check the inputs; returns them converted, with
        f's per-example output shape and the validated axes."""
        if self._prepared is None:
            self._prepare(tuple(a for a in (x1, x2) if a is not None))
        backend, prepared = self._backend, self._prepared
        x1, x2 = check_pair(backend, prepared, x1, x2, self._check_finite)
        coupled = self._batch_independent is False
        key = (  # a JAX apply serves every params pytree of one structure: their shapes are part of the key
            backend.name, prepared.apply, signature(backend, prepared.params), tuple(x1.shape[1:]),
            backend.dtype_name(x1), None if x2 is None else backend.dtype_name(x2),
            x1.shape[0] if coupled else None, self._batch_independent,
        )  # fmt: skip
        out_shape = compiled.lookup(compiled._PROBED, key, lambda: self._probe_model(x1, x2, coupled))
        axes = KernelAxes.create(*self._axes_args, (x1.shape[0], *out_shape))
        if x2 is not None and 0 in axes.diagonal and x2.shape[0] != x1.shape[0]:
            raise ValueError(
                f"diagonal_axes contains the batch axis 0, which pairs x1[i] with x2[i], but x1 has "
                f"{x1.shape[0]} examples and x2 has {x2.shape[0]}"
            )
        return x1, x2, out_shape, axes

    def _probe_model(self, x1: Any, x2: Any, coupled: bool) -> tuple[int, ...]:
        """f's per-example output shape, and (unless told) the check that examples do not interact;
        once per model, input shape and options, shared across calls like compiled kernels."""
        backend, prepared = self._backend, self._prepared
        probing = dataclasses.replace(prepared, apply=_probe(backend, prepared.apply))
        out_shape = output_shape(backend, probing, x1, coupled, x2)
        if self._batch_independent is None:
            check_independent(backend, probing, x1, x2)
        return out_shape

    def budget(self) -> tuple[float | None, str]:
        """The memory budget in bytes (``None``: unknown, no limit) and where it comes from."""
        return self._planner.budget()

    def estimates(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> dict[str, Estimate]:
        """Every candidate implementation's predicted cost on these (checked) inputs."""
        return self._planner.survey(x1, x2, out_shape, axes)[0]

    def capture(self, x1: Any) -> Any:
        """The adapter's layer capture of the model on a batch of one (cached; no warning)."""
        self._prepare((x1,)) if self._prepared is None else None
        return self._planner.capture(x1, warn=False)

    def explain(self, x1: Any, x2: Any = None, *, model_kwargs: Any = None) -> Explanation:
        """What a call on these inputs would do, predicted with nothing computed or compiled:
        FLOPs, peak bytes and time of every implementation, the choice, each layer's rule."""
        if model_kwargs is not None:
            fn, x1, x2 = self.with_arguments(model_kwargs, x1, x2)
            return fn.explain(x1, x2)
        x1, x2, out_shape, axes = self.resolve(x1, x2)
        return self._planner.explain(x1, x2, out_shape, axes, self._implementation)

    def sketch_with_error(self, x1: Any, x2: Any = None, *, model_kwargs: Any = None) -> tuple[Any, Any]:
        """``implementation="sketch"``: (the estimate, its standard error entry by entry)."""
        if self._sketch is None:
            raise ValueError('an error estimate comes with implementation="sketch" (sketch_dim=) only')
        if model_kwargs is not None:
            fn, x1, x2 = self.with_arguments(model_kwargs, x1, x2)
            return fn.sketch_with_error(x1, x2)
        x1, x2, out_shape, axes = self.resolve(x1, x2)
        capture = self._planner.capture(x1, warn=True) if self._sketch.uses_capture else None
        coupled = self._batch_independent is False
        call = KernelCall(self._backend, self._prepared.apply, axes, out_shape, coupled, capture)
        return self._sketch.with_error(call, self._prepared.params, x1, x2)

    def spec(self) -> dict:
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
            "check_finite": self._check_finite,
            "output": self._output,
            "trainable": self._trainable,
            "state": self._state,
            "reduce_readout": self._reduce_readout,
            "sketch": self._sketch,
            "model_arguments": self._arguments,
        }

    def options(self, batch_size: int) -> dict:
        """What a stored kernel depends on besides parameters and inputs (its fingerprint)."""
        trace, diagonal = self._axes_args
        return {
            "kind": self._kind,
            "backend": self._backend.name,
            "implementation": self._implementation.value if self._sketch is None else repr(self._sketch),
            "trace_axes": repr(trace),
            "diagonal_axes": repr(diagonal),
            "batch_independent": self._batch_independent,
            "batch_size": batch_size,
        }

    # -- the call ----------------------------------------------------------------------------
    def with_arguments(self, model_kwargs: Any, x1: Any, x2: Any) -> tuple[KernelFn, Any, Any]:
        """The kernel function of the model called with ``model_kwargs`` (see
        :mod:`ntkcore.model_kwargs`), and the inputs it takes (packed with per-example arguments)."""
        shared, pair = arguments.split(model_kwargs, x2 is not None)
        if self._prepared is None:
            self._prepare(tuple(a for a in (x1, x2) if a is not None))
        layout = None
        if pair is not None:
            like = next(iter(self._prepared.params.values()))
            x1, layout = arguments.pack(self._backend, x1, pair[0], like, "x1")
            if x2 is not None:
                x2, other = arguments.pack(self._backend, x2, pair[1], like, "x2")
                if other != layout:
                    raise ValueError(
                        f"model_kwargs: x2's arguments {other.arguments} differ from x1's {layout.arguments}"
                    )
        key = (arguments.identity(shared), layout)
        if key not in self._children:
            options = {"batch_size": self._batch_size, "progress": self._progress, "executor": self._executor}
            spec = {**self.spec(), "model_arguments": (shared, layout)}
            self._children[key] = KernelFn(**spec, **options, per_layer=self._per_layer)
        return self._children[key], x1, x2

    def __call__(
        self,
        x1: Any,
        x2: Any = None,
        *,
        out: Any = None,
        overwrite: bool = False,
        verify: bool = True,
        model_kwargs: Any = None,
    ) -> Any:
        """The kernel between ``x1`` and ``x2`` (``x2=None`` reuses x1's work).

        ``model_kwargs``: keyword arguments of the model's calls, a map shared by every call or
        a pair of maps of per-example arrays for x1's and x2's examples (:mod:`ntkcore.model_kwargs`).

        With ``batch_size``, ``out`` (a ``.zarr`` or ``.npy`` path: written tile by tile,
        resumable, returned opened read-only; ``verify=False`` skips reading its finished tiles
        back against their checksums) or an ``executor``, or when ``"auto"`` finds that
        the whole kernel at once does not fit the memory budget, it is computed tile by tile
        (:mod:`ntkcore.large_n`).
        """
        if model_kwargs is not None:
            fn, x1, x2 = self.with_arguments(model_kwargs, x1, x2)
            return fn(x1, x2, out=out, overwrite=overwrite, verify=verify)
        try:
            x1, x2, out_shape, axes = self.resolve(x1, x2)
        except StructuredOutput as found:
            if out is not None:
                raise ValueError(f"{found} (out= holds one kernel)") from None
            return self._per_output(found, x1, x2)
        if self._per_layer:
            if out is not None:
                raise ValueError("per_layer=True returns the layers' kernels in memory: out= is not supported")
            return self.untiled(x1, x2, out_shape, axes)
        size = self._batch_size
        if size is None and (out is not None or self._executor is not None or not self._fits(x1, x2, out_shape, axes)):
            size = large_n.tile_size(self, x1, x2, out_shape, axes, on_disk=out is not None)
        if size is None:
            return self.untiled(x1, x2, out_shape, axes)
        return large_n.compute(
            self, x1, x2, out_shape, axes, batch_size=size, out=out, overwrite=overwrite,
            progress=self._progress, executor=self._executor, verify=verify,
        )  # fmt: skip

    def _per_output(self, found: StructuredOutput, x1: Any, x2: Any) -> Any:
        """A kernel per array of a tuple/list/dict output, in its structure."""
        options = {"batch_size": self._batch_size, "progress": self._progress, "executor": self._executor}
        kernels = {
            path: KernelFn(**{**self.spec(), "output": path}, **options, per_layer=self._per_layer)(x1, x2)
            for path in found.paths
        }
        return rebuild(found.probe, kernels)

    def _fits(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> bool:
        """Whether the whole kernel can be computed at once (``"auto"``: some method fits the
        budget; an explicit implementation is always run as asked)."""
        if self._kind == "nngp" or self._implementation is not Implementation.AUTO:
            return True
        try:
            self._planner.auto_choice(x1, x2, out_shape, axes)
        except MemoryBudgetError:
            return False
        return True

    def _method(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> Method | None:
        """The implementation this call runs (``None``: the NNGP kernel)."""
        if self._kind == "nngp":
            return None
        if self._sketch is not None:
            return self._sketch
        name = self._implementation.value
        if self._implementation is Implementation.AUTO:
            name = self._planner.auto_choice(x1, x2, out_shape, axes)
        else:
            self._planner.check_budget(name, x1, x2, out_shape, axes)
        method = self._planner.method(name, x1, x2, out_shape, axes)
        if self._batch_independent is False and not method.batch_coupled:
            warnings.warn(
                f"{method.title} assume independent examples; with batch_independent=False the kernel is "
                f"computed by {REGISTRY[method.coupled_substitute].title}",
                StructuredFallbackWarning,
                stacklevel=4,
            )
            method = REGISTRY[method.coupled_substitute]
        return method

    def untiled(self, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> Any:
        """The kernel in one computation, on checked inputs (:meth:`resolve`). An implementation
        ``auto`` chose that raises on this model is excluded (for this model and input shape,
        and in ``explain``), with a warning, and the next best runs instead."""
        while True:
            method = self._method(x1, x2, out_shape, axes)
            try:
                result = self._run(method, x1, x2, out_shape, axes)
                break
            except Exception as error:
                if self._implementation is not Implementation.AUTO or method is None:
                    raise
                self._planner.exclude(method, x1, error)
        if self._check_finite:
            for layer, part in result.items() if self._per_layer else [(None, result)]:
                self._check_result(part, layer, method)
        return result

    def _run(self, method: Method | None, x1: Any, x2: Any, out_shape: tuple[int, ...], axes: KernelAxes) -> Any:
        capture = self._planner.capture(x1, warn=True) if method is not None and method.uses_capture else None
        call = KernelCall(
            self._backend, self._prepared.apply, axes, out_shape, self._batch_independent is False, capture
        )
        kernel = compiled.compiled_kernel(call, method, reuse=x2 is None, per_layer=self._per_layer)
        return kernel(self._prepared.params, x1) if x2 is None else kernel(self._prepared.params, x1, x2)

    def _check_result(self, kernel: Any, layer: str | None, method: Method | None) -> None:
        """A non-finite entry computed from finite inputs is an error, never a result."""
        if all_finite(self._backend, kernel):
            return
        what = "kernel" if layer is None else f"kernel of layer {layer!r}"
        how = "the NNGP kernel" if method is None else method.name
        raise FloatingPointError(
            f"the {what} has a non-finite entry at index {first_nonfinite(self._backend, kernel)}, computed by "
            f"{how} from finite inputs: the model's outputs or derivatives overflow or are undefined there "
            "(check the parameters' scale and dtype; float64 may help). check_finite=False returns it as it is"
        )
