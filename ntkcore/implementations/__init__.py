"""The implementations, one module each, and the one table that lists them.

``REGISTRY`` maps each ``implementation=`` name to its :class:`~ntkcore.implementations.base.Method`;
it is filled from the modules of this package that define ``METHOD`` (see CONTRIBUTING.md, "Add
an implementation"). ``auto``, ``explain``, the cost model, the demo, the benchmarks and the
tests read it; :class:`Implementation` is built from it, plus ``"sketch"`` (an approximation,
:mod:`~ntkcore.implementations.sketch`, asked for by name only) and ``"auto"``.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
from typing import Any

from .base import Cost, KernelCall, Method
from .sketch import NAME as SKETCH
from .sketch import Sketch

AUTO = "auto"


def _discover() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(method, Method):
            if method.name in found or method.name in (AUTO, SKETCH):
                raise RuntimeError(f"implementation name {method.name!r} is taken")
            found[method.name] = method
    return found


REGISTRY: dict[str, Method] = _discover()


class _Names(str, enum.Enum):
    """How the kernel is computed (arXiv 2206.08720); strings with the same values work too."""

    @classmethod
    def parse(cls, value: Any) -> Implementation:
        """Accept an :class:`Implementation` or its string value; clear error otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(
            f"implementation={value!r} is not known; expected one of {[m.value for m in cls]} "
            "or an ntkcore.Implementation member"
        )


Implementation = _Names(
    "Implementation",
    [(name.upper(), name) for name in REGISTRY] + [(SKETCH.upper(), SKETCH), (AUTO.upper(), AUTO)],
    module=__name__,
    qualname="Implementation",
)


def get(name: str | Implementation) -> Method:
    """The exact implementation called ``name`` (not ``"auto"``, which chooses among them, nor
    ``"sketch"``, which takes its own options)."""
    return REGISTRY[Implementation.parse(name).value]


__all__ = ["AUTO", "REGISTRY", "SKETCH", "Cost", "Implementation", "KernelCall", "Method", "Sketch", "get"]
