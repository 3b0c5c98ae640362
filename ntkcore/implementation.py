"""The implementation names (``"auto"`` is decided by :mod:`ntkcore.cost_model`)."""

from __future__ import annotations

import enum
from typing import Any


class Implementation(str, enum.Enum):
    """How the kernel is computed (arXiv 2206.08720); strings with the same values work too."""

    JACOBIAN_CONTRACTION = "jacobian_contraction"
    NTK_VECTOR_PRODUCTS = "ntk_vector_products"
    STRUCTURED = "structured"
    AUTO = "auto"

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
