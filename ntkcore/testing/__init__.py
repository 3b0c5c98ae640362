"""Public helpers for conformance testing, so a third-party adapter can run the same checks."""

from .reference import reference_kernel

__all__ = ["reference_kernel"]
