"""ntkcore: the finite-width (empirical) Neural Tangent Kernel, fast, on JAX, PyTorch and TensorFlow.

The core imports no framework: the adapter for a call is chosen from the model and arrays
(``backend=`` names it explicitly) and imported only then.
"""

from .api import SketchedKernel, explain, flatten, nngp, ntk, ntk_fn, ntk_from_jacobians, sketched_ntk
from .axes import KernelAxes
from .crosscheck import CrosscheckReport, crosscheck
from .explain import Explanation, MemoryBudgetError
from .factorize import factorize
from .implementations import Implementation
from .implementations.structured import StructuredFallbackWarning
from .inputs import BatchCouplingError, ModelCallError
from .kernel_fn import KernelFn
from .linearized import Linearized, linearize, taylor_expand
from .monte_carlo import monte_carlo
from .operators import NTKOperator, ntk_operator
from .outputs import OutputChoiceError
from .planner import AutoFallbackWarning
from .predict import (
    Posterior,
    Prediction,
    alignment,
    drift,
    gd_mse,
    gp_inference,
    gradient_descent,
    kernel_drift,
    kernel_regression,
    max_learning_rate,
)
from .protocol import AutodiffBackend, PreparedModel
from .registry import get_backend, installed_backends, known_backends
from .spectra import ConvergenceError, Spectrum, spectrum
from .stores import StoreLockedError, StoreMismatchError
from .transfer import TransferError, transfer

__version__ = "0.1.0"

__all__ = [
    "AutoFallbackWarning",
    "AutodiffBackend",
    "BatchCouplingError",
    "ConvergenceError",
    "CrosscheckReport",
    "Explanation",
    "Implementation",
    "KernelAxes",
    "KernelFn",
    "Linearized",
    "MemoryBudgetError",
    "ModelCallError",
    "NTKOperator",
    "OutputChoiceError",
    "Posterior",
    "Prediction",
    "PreparedModel",
    "SketchedKernel",
    "Spectrum",
    "StoreLockedError",
    "StoreMismatchError",
    "StructuredFallbackWarning",
    "TransferError",
    "alignment",
    "crosscheck",
    "drift",
    "explain",
    "factorize",
    "flatten",
    "gd_mse",
    "get_backend",
    "gp_inference",
    "gradient_descent",
    "installed_backends",
    "kernel_drift",
    "kernel_regression",
    "known_backends",
    "linearize",
    "max_learning_rate",
    "monte_carlo",
    "nngp",
    "ntk",
    "ntk_fn",
    "ntk_from_jacobians",
    "ntk_operator",
    "sketched_ntk",
    "spectrum",
    "taylor_expand",
    "transfer",
]
