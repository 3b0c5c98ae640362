"""The autodiff interface every framework adapter implements.

The algorithms in ``ntkcore.algorithms`` call only what is declared here, so a new framework
needs one adapter (a few hundred lines) and no change to the core. Arrays stay native to their
framework throughout: the core never wraps them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Array = Any
Params = Mapping[str, Array]
ApplyFn = Callable[[Params, Array], Array]


@dataclass(frozen=True)
class PreparedModel:
    """A framework model turned into a pure function of an ordered parameter map.

    ``apply(params, x)`` evaluates the model on a batch ``x`` with the trainable parameters
    ``params`` (an ordered ``name -> array`` map); everything else (buffers, frozen
    parameters, non-trainable state) is a constant captured by ``apply``.
    ``batch_coupled`` names what makes examples interact (for example a train-mode
    BatchNorm), or is ``None`` when the adapter knows of nothing that does.
    ``accepts_integer_inputs(x)`` says whether the model consumes integer inputs ``x`` as
    indices (an embedding) rather than as numbers; integer inputs it does not accept are
    refused with a clear error. ``handles`` are the framework's own objects behind ``params``,
    in its order, where the adapter's capture needs them (Keras variables).
    """

    apply: ApplyFn
    params: dict[str, Array]
    batch_coupled: str | None = None
    accepts_integer_inputs: Callable[[Array], bool] = lambda x: False
    source: Any = field(default=None, repr=False)
    handles: tuple[Any, ...] = field(default=(), repr=False)


LAYER_OUTPUT = "/output"  # suffix of a captured call's output among apply_probed's inputs


@dataclass(frozen=True)
class LayerUse:
    """One call of a parameterised layer, as structured derivatives see it.

    ``kind`` names the core's rule (``"dense"``, ``"affine"``, ``"embedding"``); ``params`` maps
    the rule's roles to names in the parameter map (dense: ``weight``, ``bias``; affine:
    ``scale``, ``shift``; embedding: ``table``), trainable ones only. The layer's *structured
    input* (dense: its input; affine: the normalised input x̂; embedding: the integer ids)
    and its output have the feature axis last and any number of token axes before it.
    ``native_layout`` says the parameters are laid out as the rule's per-example gradients
    (dense weight (out, in), embedding table (vocabulary, features), affine (features,)), so
    that a parameter shared by layers of different kinds (an embedding tied to an output
    projection) is summed from them instead of falling back.
    """

    key: str
    layer: str
    kind: str
    params: Mapping[str, str]
    feature_axis: int = -1  # of the layer's output (batch of one) and structured input
    native_layout: bool = False
    groups: int = 1  # a grouped convolution's groups (its rule's costs depend on them)


@dataclass(frozen=True, eq=False)  # hashed by identity: it keys compiled kernels
class Capture:
    """What an adapter's ``capture`` returns for one model.

    ``apply_probed(params, probes, x) -> (output, inputs)`` evaluates the model with
    ``probes[use.key]`` added to the output of each captured layer call (zeros leave f
    unchanged; the vjp with respect to them is the layer's output cotangent g) and returns the
    structured inputs ``inputs[use.key]`` (and, under ``use.key + LAYER_OUTPUT``, the call's
    output before its probe, features on ``use.feature_axis``: :mod:`ntkcore.crosscheck` compares
    them across frameworks). ``output_shapes[use.key]`` is the shape of a
    probe (a batch of one). ``unsupported`` names layers with trainable parameters and no
    rule; ``excluded`` maps parameters that must take the exact per-layer fallback to the
    reason (a use outside their layer, an operation without a rule). ``framework_gradients``
    names kinds whose per-example parameter gradients the framework's own backward pass
    computes faster than the core's rule's per-example gradients (convolutions outside XLA):
    they are taken in the same backward passes as the cotangents. ``deferred_inputs`` maps the
    names of such layers whose structured input the adapter can form on request to a function
    of what ``apply_probed`` recorded for a call, stacked over examples (N, 1, ...), giving that
    input (a convolution's patches (N, S, G, K)); the core asks for it where the rule's other
    order is cheaper than the framework's gradients (:meth:`ntkcore.rules.base.Rule.beats_framework`).
    """

    uses: tuple[LayerUse, ...]
    apply_probed: Callable[[Params, Mapping[str, Array], Array], tuple[Array, dict[str, Array]]]
    output_shapes: Mapping[str, tuple[int, ...]]
    unsupported: tuple[str, ...] = ()
    excluded: Mapping[str, str] = field(default_factory=dict)
    framework_gradients: frozenset[str] = frozenset()
    deferred_inputs: Mapping[str, Callable[[Array], Array]] = field(default_factory=dict)


@runtime_checkable
class AutodiffBackend(Protocol):
    """What the core needs from a framework.

    Functions handed to ``jvp``/``vjp`` take a parameter map and return one array; the
    tangents and cotangents are parameter maps with the same keys. Optional:
    ``memory_available(like) -> int | None``, the free bytes of the accelerator holding
    ``like`` (``None`` on a CPU, where the core reads host RAM): the default memory budget of
    ``implementation="auto"``. ``dense_layers(model, params)`` and ``factorized(model, params,
    factors)``: the dense layers of a model and a copy with some replaced by ntkcore's factorized
    layer, for :func:`ntkcore.factorize`.
    """

    name: str

    def owns(self, model: Any, params: Any, arrays: tuple[Any, ...]) -> bool:
        """Whether this adapter handles ``model`` (with ``params``) and these input arrays."""

    def prepare(self, model: Any, params: Any) -> PreparedModel:
        """Turn a framework model (and optional params) into a :class:`PreparedModel`. Adapters
        may take ``trainable=`` too (a predicate on parameter names choosing θ); it is passed
        only when the user gives it."""

    def namespace(self, *arrays: Array) -> Any:
        """The array-API namespace for this framework's arrays."""

    def asarray(self, x: Any, *, like: Array) -> Array:
        """Convert ``x`` (numpy or native) to a native array on ``like``'s device."""

    def to_numpy(self, x: Array) -> Any:
        """A host numpy copy of a native array."""

    def is_floating(self, x: Array) -> bool:
        """Whether ``x`` has a real floating dtype."""

    def dtype_name(self, x: Array) -> str:
        """A readable dtype name, for error messages."""

    def jvp(self, fn: Callable[[Params], Array], primals: Params, tangents: Params) -> tuple[Array, Array]:
        """Forward mode: ``(fn(primals), d fn(primals) . tangents)``."""

    def vjp(self, fn: Callable[[Params], Array], primals: Params) -> tuple[Array, Callable[[Array], dict[str, Array]]]:
        """Reverse mode: ``(fn(primals), cotangent -> parameter-map cotangent)``."""

    def vmap(
        self, fn: Callable[..., Any], in_axes: tuple[int | None, ...], chunk_size: int | None = None
    ) -> Callable[..., Any]:
        """Vectorise ``fn`` over axis 0 of the arguments whose ``in_axes`` entry is 0.

        Outputs (arrays or parameter maps of arrays) are stacked along a new axis 0. With
        ``chunk_size``, at most that many elements are vectorised at once and the chunks run
        one after another (bounding the memory of large per-element intermediates).
        """

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn`` where the framework can (identity where it cannot)."""

    def capture(self, prepared: PreparedModel, x: Array) -> Capture:
        """Find the parameterised layer calls of ``prepared`` on a batch of one, ``x``.

        Adapters without per-layer capture raise ``NotImplementedError``.
        """
