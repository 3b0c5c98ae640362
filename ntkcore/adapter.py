"""The base class of the framework adapters, and the capture machinery they share.

:class:`Adapter` gives the defaults of :class:`~ntkcore.protocol.AutodiffBackend` (array-API
namespace, numpy conversion, no accelerator memory figure, the lazy ``capture`` and
``factorize`` modules of the adapter's package), so that an adapter implements only what its
framework does differently. The capture helpers hold what every framework's capture does the
same way: keys ``layer#call`` per call of a layer (:class:`CallRecorder`), wrappers installed
for one forward pass and restored after it (:class:`Patches`), the audit of parameters used
outside their own layer (:class:`ParameterAudit`), and the :class:`~ntkcore.protocol.Capture`
built from a table of the layers that have rules (:func:`build_capture`). Framework-free.
"""

from __future__ import annotations

import importlib
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from .protocol import LAYER_OUTPUT, Capture, LayerUse, PreparedModel

NUMPY_LIKE = (np.ndarray, np.generic, list, tuple)


class Adapter:
    """Defaults for a framework adapter; subclasses set ``name`` and ``native`` (the types of
    the framework's arrays) and implement ``owns``, ``prepare``, ``jvp``, ``vjp``, ``vmap``,
    ``is_floating``, ``dtype_name`` and :meth:`from_numpy`.

    ``capture`` and ``factorize`` live in the adapter package's ``capture`` and ``factorize``
    modules (``capture(prepared, x)``, ``dense_layers(model, params)``, ``factorized(model,
    params, factors)``), imported on first use.
    """

    name: str
    native: tuple[type, ...] = ()
    arrays_text = "a numpy array"  # what asarray accepts, and for what model, in its error message
    model_text = ""
    numpy_like: tuple[type, ...] = NUMPY_LIKE

    def namespace(self, *arrays: Any) -> Any:
        return array_api_compat.array_namespace(*arrays)

    def asarray(self, x: Any, *, like: Any) -> Any:
        """``x`` as a native array; floating point, native or numpy, in ``like``'s dtype (the same
        rule for every framework: inputs take the parameters' precision)."""
        if isinstance(x, self.native):
            if self.is_floating(x) and self.dtype_name(x) != self.dtype_name(like):
                return self.cast(x, like)
            return x
        if not isinstance(x, self.numpy_like):
            raise TypeError(
                f"expected {self.arrays_text} for a {self.model_text or self.name} model, got "
                f"{type(x).__module__}.{type(x).__name__}"
            )
        x = np.asarray(x)
        return self.from_numpy(x, like, cast=bool(np.issubdtype(x.dtype, np.floating)))

    def from_numpy(self, x: np.ndarray, like: Any, *, cast: bool) -> Any:
        """``x`` as a native array on ``like``'s device, in ``like``'s dtype when ``cast``."""
        raise NotImplementedError

    def replacement(self, name: str, value: Any, own: Any, what: str = "parameter") -> Any:
        """A ``params=`` value for parameter ``name``: of ``own``'s shape exactly; a native array
        of its dtype, or numpy data (converted to it)."""
        if isinstance(value, self.native):
            if self.dtype_name(value) != self.dtype_name(own):
                raise TypeError(
                    f"params[{name!r}] has dtype {self.dtype_name(value)}, but the {what} is {self.dtype_name(own)}"
                )
        elif isinstance(value, (*self.numpy_like, float, int)):
            value = self.from_numpy(np.asarray(value), own, cast=True)
        else:
            raise TypeError(
                f"params[{name!r}] must be {self.arrays_text}, got {type(value).__module__}.{type(value).__name__}"
            )
        if tuple(value.shape) != tuple(own.shape):
            raise ValueError(f"params[{name!r}] has shape {tuple(value.shape)}, but the {what} has {tuple(own.shape)}")
        return value

    def cast(self, x: Any, like: Any) -> Any:
        """A native ``x`` in ``like``'s dtype (and on its device)."""
        raise NotImplementedError

    def expected_input(self, prepared: PreparedModel) -> str | None:
        """What the model's inputs should look like, where the adapter can tell (for errors)."""
        return None

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def memory_available(self, like: Any) -> int | None:
        """Free bytes of the accelerator holding ``like``; ``None`` on a CPU."""
        return None

    def _module(self, name: str) -> Any:
        return importlib.import_module(f".{name}", sys.modules[type(self).__module__].__package__)

    def capture(self, prepared: PreparedModel, x: Any) -> Capture:
        """The layer capture of ``prepared`` on a batch of one (the package's ``capture`` module)."""
        return self._module("capture").capture(prepared, x)

    def dense_layers(self, model: Any, params: Any) -> dict:
        """Name -> ((in, out) float64 weight, trainable) of the dense layers ``factorize`` can replace."""
        return self._module("factorize").dense_layers(model, params)

    def factorized(self, model: Any, params: Any, factors: Mapping[str, Any]) -> Any:
        """The model with the named dense layers replaced by ntkcore's factorized layer."""
        return self._module("factorize").factorized(model, params, factors)

    def transfer_layers(self, model: Any, params: Any) -> list:
        """The model's parameterised layers in call order, canonical layouts (:mod:`ntkcore.transfer`)."""
        return self._module("transfer").layers(model, params)

    def transfer_assign(self, model: Any, params: Any, values: Mapping[str, Mapping[str, Any]]) -> Any:
        """``model`` (in place) or its new params with canonical ``values`` (layer -> role -> array)."""
        return self._module("transfer").assign(model, params, values)


def replaced_params(
    own: Mapping[str, Any],
    given: Mapping[str, Any],
    convert: Callable[[str, Any, Any], Any],
    unknown_message: Callable[[list[str]], str],
) -> dict[str, Any]:
    """``own`` with the values of ``params=`` (``given``), each checked and converted by
    ``convert(name, value, own_value)``; every mismatch is named, in one error (a ``TypeError``
    when all of them are dtypes or types, else a ``ValueError``)."""
    unknown = [name for name in given if name not in own]
    problems, kinds = ([unknown_message(unknown)], [ValueError]) if unknown else ([], [])
    result = dict(own)
    for name, value in given.items():
        if name in own:
            try:
                result[name] = convert(name, value, own[name])
            except (TypeError, ValueError) as error:
                problems.append(str(error))
                kinds.append(type(error))
    if problems:
        raise (TypeError if all(kind is TypeError for kind in kinds) else ValueError)("; ".join(problems))
    return result


class ApplyCache:
    """The ``apply`` made before for the same model and constants, so that the core's compiled
    kernels are reused across ``ntk()`` calls. An entry keeps what its key's ids refer to alive,
    so the ids stay unique while it lives."""

    def __init__(self, size: int = 32) -> None:
        self.size, self.entries = size, OrderedDict()

    def shared(self, key: Hashable, apply: Callable, *keep: Any) -> Callable:
        """The cached ``apply`` for ``key``, or ``apply`` itself, now cached."""
        if key not in self.entries:
            self.entries[key] = (apply, keep)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return self.entries[key][0]


@dataclass(frozen=True)
class LayerEntry:
    """A layer with a rule: its kind, role -> parameter name (trainable only), feature axis, and
    whether its parameters are laid out as the rule's per-example gradients (``LayerUse.native_layout``)."""

    kind: str
    roles: Mapping[str, str]
    feature_axis: int = -1
    native: bool = True
    groups: int = 1


class CallRecorder:
    """Keys ``layer#i`` for the i-th call of each layer in one forward pass, with what the rule
    needs of it: the structured input and the output shape; adds the probes when given."""

    def __init__(self, probes: Mapping[str, Any] | None = None) -> None:
        self.probes = probes
        self.counters: dict[str, int] = defaultdict(int)
        self.inputs: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def next_key(self, layer: str) -> str:
        key = f"{layer}#{self.counters[layer]}"
        self.counters[layer] += 1
        return key

    def record(self, key: str, structured_input: Any, output: Any) -> Any:
        """Record one call; returns the output with its probe added (if probing). A structured
        input of ``None``: the framework differentiates the layer itself (``framework_gradients``)."""
        if structured_input is not None:
            self.inputs[key] = structured_input
        self.inputs[key + LAYER_OUTPUT] = output  # for crosscheck; unused entries cost nothing
        self.shapes[key] = tuple(output.shape)
        return output if self.probes is None else output + self.probes[key]


class ParameterAudit:
    """Which parameters are used outside their own layer's call (tied weights, a functional use
    of another layer's weight): those take the exact fallback, so an unseen use never gives a
    wrong number. Frameworks report calls (:meth:`entered` / :meth:`left`) and parameter uses
    (:meth:`used`)."""

    def __init__(self, owners: Mapping[str, set[str]]) -> None:
        self.owners = owners  # parameter name -> the layers that own it
        self.active: list[str] = []
        self.outside: set[str] = set()

    def entered(self, layer: str) -> None:
        self.active.append(layer)

    def left(self) -> None:
        self.active.pop()

    def used(self, name: str) -> None:
        owners = self.owners.get(name)
        if owners is not None and (not self.active or self.active[-1] not in owners):
            self.outside.add(name)

    def excluded(self, why: str) -> dict[str, str]:
        return {name: why for name in sorted(self.outside)}


def owners_of(table: Mapping[str, LayerEntry]) -> dict[str, set[str]]:
    """Parameter name -> the layers of ``table`` that own it."""
    owners: dict[str, set[str]] = defaultdict(set)
    for layer, entry in table.items():
        for name in entry.roles.values():
            owners[name].add(layer)
    return owners


class Patches:
    """Attributes replaced for one forward pass (a layer's ``forward`` or ``call``) and hook
    handles, all undone by :meth:`restore`."""

    _MISSING = object()

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, obj: Any, attr: str, value: Any) -> None:
        """``obj.attr = value`` until restored (an instance attribute, the class's left alone)."""
        before = obj.__dict__.get(attr, self._MISSING)
        setattr(obj, attr, value)
        self._undo.append(lambda: delattr(obj, attr) if before is self._MISSING else setattr(obj, attr, before))

    def handle(self, handle: Any) -> None:
        """A hook handle whose ``remove()`` undoes it."""
        self._undo.append(handle.remove)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextmanager
def patched(install: Callable[[Patches], None]) -> Iterator[None]:
    """Run a block with ``install``'s patches in place, undone even when it fails."""
    patches = Patches()
    try:
        install(patches)
        yield
    finally:
        patches.restore()


def build_capture(
    table: Mapping[str, LayerEntry],
    shapes: Mapping[str, tuple[int, ...]],
    apply_probed: Callable,
    *,
    unsupported: tuple[str, ...] = (),
    excluded: Mapping[str, str] | None = None,
    framework_gradients: frozenset[str] = frozenset(),
    native_layout: bool = False,
    deferred_inputs: Mapping[str, Callable] | None = None,
) -> Capture:
    """The :class:`Capture` of the calls recorded as ``layer#i`` keys (``shapes``) of ``table``'s layers."""
    uses = []
    for key in shapes:
        layer = key.rpartition("#")[0]
        entry = table[layer]
        native = native_layout and entry.native
        uses.append(LayerUse(key, layer, entry.kind, entry.roles, entry.feature_axis, native, entry.groups))
    return Capture(
        tuple(uses),
        apply_probed,
        dict(shapes),
        unsupported,
        dict(excluded or {}),
        framework_gradients,
        dict(deferred_inputs or {}),
    )
