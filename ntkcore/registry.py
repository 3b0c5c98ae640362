"""Find the adapter for a call, lazily and without global state.

Built-in adapters are listed by name with the framework module they need; an adapter is
imported only when its framework is already imported by the caller (detection) or when it
is named explicitly with ``backend=``. Third parties register more adapters through the
``ntkcore.backends`` entry-point group; the entry point's value is ``module:Class`` and the
class is instantiated without arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from .builtin_backends import BUILTIN
from .protocol import AutodiffBackend

ENTRY_POINT_GROUP = "ntkcore.backends"
ALIASES = {"pytorch": "torch", "tf": "tensorflow", "keras": "tensorflow"}


def _load(target: str) -> AutodiffBackend:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)()


@cache
def _plugin_entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


@cache
def _instance(name: str) -> AutodiffBackend:
    if name in BUILTIN:
        return _load(BUILTIN[name][1])
    return _plugin_entry_points()[name].load()()


def known_backends() -> list[str]:
    """Names accepted by ``backend=``: the built-ins and every registered entry point."""
    return [*BUILTIN, *_plugin_entry_points()]


def installed_backends() -> list[str]:
    """Built-in backends whose framework can be imported here (nothing is imported)."""
    return [name for name, (module, _) in BUILTIN.items() if importlib.util.find_spec(module)]


def get_backend(name: str) -> AutodiffBackend:
    """The adapter called ``name``; imports its framework. Clear errors for unknown names."""
    if not isinstance(name, str):
        raise TypeError(f"backend= must be a backend name (str) or None, got {type(name).__name__}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BUILTIN and key not in _plugin_entry_points():
        raise ValueError(f"backend={name!r} is not known; expected one of {known_backends()}")
    if key in BUILTIN and importlib.util.find_spec(BUILTIN[key][0]) is None:
        raise ImportError(
            f"backend={name!r} needs the {BUILTIN[key][0]!r} package, which is not installed; "
            f"install it with: pip install 'ntkcore[{key}]'"
        )
    return _instance(key)


def detect_backend(model: Any, params: Any, arrays: tuple[Any, ...]) -> AutodiffBackend:
    """The adapter that owns this model/params/arrays, among frameworks already imported."""
    candidates = [name for name, (module, _) in BUILTIN.items() if module in sys.modules]
    candidates += list(_plugin_entry_points())
    # The model decides first (a Keras model given torch tensors is TensorFlow's, and its
    # adapter says what is wrong with the inputs); params and arrays only when it cannot.
    for owned in (lambda b: b.owns(model, None, ()), lambda b: b.owns(model, params, arrays)):
        for name in candidates:
            backend = _instance(name)
            if owned(backend):
                return backend
    raise TypeError(
        f"could not infer the framework of model {type(model).__name__!r}: it is not a torch "
        "nn.Module, a Keras model or tf.Module, and its params/inputs are not JAX arrays. "
        f"Pass backend= one of {known_backends()}."
    )


def backend_for_arrays(*arrays: Any) -> AutodiffBackend | None:
    """The adapter whose framework owns these arrays (already-imported frameworks only)."""
    for name, (module, _) in BUILTIN.items():
        if module in sys.modules:
            backend = _instance(name)
            if backend.owns(None, None, arrays):
                return backend
    return None
