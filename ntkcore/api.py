"""Public entry points: ``ntk``, ``ntk_fn``, ``nngp``, ``explain`` (thin: they build a
:class:`~ntkcore.kernel_fn.KernelFn` and call it), and the array helpers ``ntk_from_jacobians``
and ``flatten``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ._xp import namespace_of
from .axes import KernelAxes
from .contraction import contract, jacobian_shapes
from .explain import Explanation
from .implementations import Implementation, Sketch
from .kernel_fn import KernelFn

Axes = int | Sequence[int]


class SketchedKernel(NamedTuple):
    """:func:`sketched_ntk`'s result: the estimate and its standard error (same shape)."""

    kernel: Any
    standard_error: Any


def ntk_fn(
    model: Any,
    *,
    params: Any = None,
    implementation: Implementation | str = "auto",
    trace_axes: Axes = (),
    diagonal_axes: Axes = (),
    backend: str | None = None,
    batch_independent: bool | None = None,
    check_finite: bool = True,
    state: Any = None,
    output: Any = None,
    trainable: Any = None,
    memory_budget: float | str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    executor: Any = None,
    per_layer: bool = False,
    reduce_readout: bool | None = None,
    sketch_dim: int | None = None,
    seed: int = 0,
    sketch_blocks: int = 8,
    sketch_kronecker: bool = False,
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
        check_finite=check_finite,
        state=state,
        output=output,
        trainable=trainable,
        kind="ntk",
        memory_budget=memory_budget,
        batch_size=batch_size,
        progress=progress,
        executor=executor,
        per_layer=per_layer,
        reduce_readout=reduce_readout,
        sketch=None if sketch_dim is None else Sketch(sketch_dim, seed, sketch_blocks, sketch_kronecker),
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
    check_finite: bool = True,
    state: Any = None,
    output: Any = None,
    trainable: Any = None,
    memory_budget: float | str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    executor: Any = None,
    out: Any = None,
    overwrite: bool = False,
    verify: bool = True,
    per_layer: bool = False,
    reduce_readout: bool | None = None,
    sketch_dim: int | None = None,
    seed: int = 0,
    sketch_blocks: int = 8,
    sketch_kronecker: bool = False,
    model_kwargs: Any = None,
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
        batch_independent: ``None`` (default) checks that examples do not interact (one
            forward pass of two examples against each alone; a model whose examples interact
            is refused); ``False`` computes the exact kernel of a batch whose examples
            interact; ``True`` skips the check.
        output: which output of the model the kernel is of: a key or attribute name
            (``output="logits"``), a path of them (``("hidden", 0)``), or a function of the
            model's output (``output=lambda out: out.logits[:, -1]``). Without it, a model that
            returns a tuple, list or dict of arrays gets a kernel per array, in that structure;
            an output object of another type (a transformers ``ModelOutput``) is refused with a
            message that suggests ``output=``.
        trainable: a predicate on parameter names choosing θ instead of the defaults (torch
            ``requires_grad``, Keras trainable variables, a JAX pytree's floating leaves — of its
            ``"params"`` collection only, when it has one), e.g. ``lambda name: "head" in name``.
        state: a haiku ``transform_with_state`` model's state (constants), with ``params=``.
        check_finite: refuse inputs with NaN or infinite entries (``ValueError``) and kernels
            with a non-finite entry (``FloatingPointError``, naming its index); ``False`` skips
            both checks, as in SciPy.
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
        verify: read an existing ``out``'s finished tiles back against their checksums (a
            damaged, deleted or swapped tile is computed again); ``False`` trusts them.
        per_layer: return a map layer name -> that layer's contribution J1_l·J2_lᵀ (they sum to
            the kernel). A layer is a parameter name up to its last ``.`` or ``/`` (torch
            ``"fc1"`` for ``"fc1.weight"``), or the parameter itself. Structured derivatives
            and Jacobian contraction give them at the cost of the kernel; NTK-vector products
            take one pass per layer. Not with tiling (``batch_size``, ``out``, ``executor``).
        reduce_readout: where the model ends in a linear layer wider than its input (logits over
            a vocabulary), an implementation may differentiate that input h and add the readout
            exactly, Θ = A·Θ_h·Aᵀ + (h1·h2 + 1)·I (:mod:`ntkcore.readout`): ``None`` (default)
            where the cost model predicts it cheaper, ``True`` always, ``False`` never (the
            general path: the same kernel, at the cost of every output). ``explain`` says which.
        sketch_dim, seed, sketch_blocks: with ``implementation="sketch"``, an unbiased random
            estimate instead of the exact kernel: Θ ≈ (J·R)(J·R)ᵀ/k for a P×k Rademacher matrix R
            (k = ``sketch_dim`` forward-mode products of the batch, J never formed; error ∝ 1/√k),
            the same R for a given ``seed`` (so tiles and stores hold one sketch). Never chosen by
            ``"auto"``; :func:`sketched_ntk` gives its standard error too. ``sketch_kronecker``:
            columns s⊗r per dense layer, embedding and (where it costs less) convolution from the
            layer capture (tokens × (F + in) per column and layer instead of F × in, after N·O
            backward passes).
        model_kwargs: keyword arguments of the model's calls: a map shared by every call
            (``{"deterministic": True}``), or a pair ``(kw1, kw2)`` of maps of per-example arrays
            for x1's and x2's examples (padding masks; ``kw2=None`` with ``x2=None``).

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
        check_finite=check_finite,
        state=state,
        output=output,
        trainable=trainable,
        memory_budget=memory_budget,
        batch_size=batch_size,
        progress=progress,
        executor=executor,
        per_layer=per_layer,
        reduce_readout=reduce_readout,
        sketch_dim=sketch_dim,
        seed=seed,
        sketch_blocks=sketch_blocks,
        sketch_kronecker=sketch_kronecker,
    )
    return fn(x1, x2, out=out, overwrite=overwrite, verify=verify, model_kwargs=model_kwargs)


def sketched_ntk(
    model: Any,
    x1: Any,
    x2: Any = None,
    *,
    sketch_dim: int,
    seed: int = 0,
    sketch_blocks: int = 8,
    sketch_kronecker: bool = False,
    model_kwargs: Any = None,
    **options: Any,
) -> SketchedKernel:
    """The sketched NTK (``implementation="sketch"``) and its standard error, entry by entry.

    The k = ``sketch_dim`` random projections are split into ``sketch_blocks`` independent
    groups; their estimates average to the kernel and their spread estimates its error (the
    true kernel lies within ±2 standard errors of most entries). ``model_kwargs`` as in
    :func:`ntk`; ``options`` are those of :func:`ntk_fn` (axes, ``params=``, ``output=``, ...).
    """
    fn = ntk_fn(
        model,
        implementation="sketch",
        sketch_dim=sketch_dim,
        seed=seed,
        sketch_blocks=sketch_blocks,
        sketch_kronecker=sketch_kronecker,
        **options,
    )
    return SketchedKernel(*fn.sketch_with_error(x1, x2, model_kwargs=model_kwargs))


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
    check_finite: bool = True,
    state: Any = None,
    output: Any = None,
    trainable: Any = None,
    memory_budget: float | str | None = None,
    reduce_readout: bool | None = None,
    model_kwargs: Any = None,
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
        check_finite=check_finite,
        state=state,
        output=output,
        trainable=trainable,
        memory_budget=memory_budget,
        reduce_readout=reduce_readout,
    )
    return fn.explain(x1, x2, model_kwargs=model_kwargs)


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
    check_finite: bool = True,
    state: Any = None,
    output: Any = None,
    trainable: Any = None,
    batch_size: int | None = None,
    out: Any = None,
    overwrite: bool = False,
    progress: bool | None = None,
    model_kwargs: Any = None,
) -> Any:
    """The empirical NNGP kernel f(x1)·f(x2)ᵀ, with the axis conventions of :func:`ntk`."""
    fn = KernelFn(
        model,
        params=params,
        trace_axes=trace_axes,
        diagonal_axes=diagonal_axes,
        backend=backend,
        batch_independent=batch_independent,
        check_finite=check_finite,
        state=state,
        output=output,
        trainable=trainable,
        kind="nngp",
        batch_size=batch_size,
        progress=progress,
    )
    return fn(x1, x2, out=out, overwrite=overwrite, model_kwargs=model_kwargs)


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
    jac2 = jac1 if jac2 is None else jac2
    shape1, shape2 = jacobian_shapes(jac1, jac2, output_ndim)
    axes = KernelAxes.create(trace_axes, diagonal_axes, shape1)
    if 0 in axes.diagonal and shape1[0] != shape2[0]:
        raise ValueError(
            f"diagonal_axes=(0, ...) needs as many examples in jac2 ({shape2[0]}) as in jac1 ({shape1[0]})"
        )
    xp = namespace_of(*jac1.values(), *jac2.values())
    return contract(xp, jac1, jac2, axes, shape1, shape2)


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
