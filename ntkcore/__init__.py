"""ntkcore: the finite-width (empirical) Neural Tangent Kernel, fast, on JAX, PyTorch and TensorFlow.

The core imports no framework: the adapter for a call is chosen from the model and arrays
(``backend=`` names it explicitly) and imported only then.
"""

from .api import KernelFn, StructuredFallbackWarning, explain, flatten, nngp, ntk, ntk_fn, ntk_from_jacobians
from .axes import KernelAxes
from .explain import Explanation, MemoryBudgetError
from .implementation import Implementation
from .protocol import AutodiffBackend, PreparedModel
from .registry import get_backend, installed_backends, known_backends

__version__ = "0.1.0"

__all__ = [
    "AutodiffBackend",
    "Explanation",
    "Implementation",
    "KernelAxes",
    "KernelFn",
    "MemoryBudgetError",
    "PreparedModel",
    "StructuredFallbackWarning",
    "explain",
    "flatten",
    "get_backend",
    "installed_backends",
    "known_backends",
    "nngp",
    "ntk",
    "ntk_fn",
    "ntk_from_jacobians",
]
