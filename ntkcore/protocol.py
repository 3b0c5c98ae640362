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
    refused with a clear error.
    """

    apply: ApplyFn
    params: dict[str, Array]
    batch_coupled: str | None = None
    accepts_integer_inputs: Callable[[Array], bool] = lambda x: False
    source: Any = field(default=None, repr=False)


@runtime_checkable
class AutodiffBackend(Protocol):
    """What the core needs from a framework.

    Functions handed to ``jvp``/``vjp`` take a parameter map and return one array; the
    tangents and cotangents are parameter maps with the same keys.
    """

    name: str

    def owns(self, model: Any, params: Any, arrays: tuple[Any, ...]) -> bool:
        """Whether this adapter handles ``model`` (with ``params``) and these input arrays."""

    def prepare(self, model: Any, params: Any) -> PreparedModel:
        """Turn a framework model (and optional params) into a :class:`PreparedModel`."""

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

    def vmap(self, fn: Callable[..., Any], in_axes: tuple[int | None, ...]) -> Callable[..., Any]:
        """Vectorise ``fn`` over axis 0 of the arguments whose ``in_axes`` entry is 0.

        Outputs (arrays or parameter maps of arrays) are stacked along a new axis 0.
        """

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Compile ``fn`` where the framework can (identity where it cannot)."""

    def capture(self, prepared: PreparedModel, x: Array) -> Any:
        """Per-layer inputs and output cotangents for structured derivatives.

        Reserved for the structured-derivatives algorithm; adapters that do not support it
        raise ``NotImplementedError``.
        """
