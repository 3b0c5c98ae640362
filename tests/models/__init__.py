"""The model zoo: one file per framework, all built from :mod:`tests.models.spec`.

Each framework module exposes the same functions:

- ``setup_numerics()``: float32 matmuls at full precision (no TF32), float64 enabled;
- ``build(case, dtype) -> Built``: the case's model in that framework;
- ``to_native(x, dtype)`` / ``to_numpy(a)``: array conversion;
- ``reference_jacobians(case, x)``: float64 full-batch Jacobians ``name -> (N, *out, P)``
  from the framework's own jacobian function, independent of ntkcore's algorithms;
- ``linear(w, b) -> Built``: one float64 dense layer x·w + b, for closed-form checks;
- ``is_native(a, dtype)``, ``forward(built, x)``, ``freeze(built)`` (no trainable parameter),
  ``train_mode_batchnorm`` (or ``None`` where a framework has no train/eval mode);
- ``CAPABILITIES`` (known gaps as data, e.g. ``{"structured"}``), ``STRUCTURED_CASES`` with
  ``structured_case(name)`` and ``factorized_case()`` for the structured-derivatives tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ntkcore.registry import BUILTIN

FRAMEWORK_MODULES = {name: f"tests.models.{name}_models" for name in BUILTIN}


@dataclass
class Built:
    """A zoo model: what to pass to ``ntkcore.ntk`` as ``model`` and as keyword arguments."""

    model: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
