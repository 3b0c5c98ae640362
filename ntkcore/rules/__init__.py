"""Structure rules, one module per layer kind, written once in array-API terms.

``RULES`` maps each kind to its :class:`~ntkcore.rules.base.Rule`; it is filled from the
modules of this package that define ``RULE`` (see CONTRIBUTING.md, "Add a layer rule"), so the
structured engine, the cost model and ``explain`` never name a kind.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Rule


def _discover() -> dict[str, Rule]:
    found: dict[str, Rule] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        rule = getattr(importlib.import_module(f"{__name__}.{info.name}"), "RULE", None)
        if isinstance(rule, Rule):
            if rule.kind in found:
                raise RuntimeError(f"two structure rules for kind {rule.kind!r}")
            found[rule.kind] = rule
    return found


RULES: dict[str, Rule] = _discover()

__all__ = ["RULES", "Rule"]
