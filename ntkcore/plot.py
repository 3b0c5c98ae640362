"""Plots for people who would rather look: the spectrum of a kernel and the kernel itself.

matplotlib is imported here only (``pip install 'ntkcore[plot]'``); every function returns the
``Figure`` and draws on ``ax`` when one is given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .spectra import Spectrum, square_matrix, to_host
from .spectra import spectrum as _spectrum


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("ntkcore.plot needs matplotlib: pip install 'ntkcore[plot]'") from None
    return plt


def _axes(ax: Any) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    return _pyplot().subplots(figsize=(5, 3.5), layout="constrained")


def spectrum(kernel: Any, *, ax: Any = None, label: str | None = None) -> Any:
    """Eigenvalues in descending order on a log scale, with λ_min, λ_max and the condition
    number in the title. ``kernel``: a kernel (as :func:`ntkcore.spectrum` takes) or a
    :class:`~ntkcore.spectra.Spectrum`."""
    result = kernel if isinstance(kernel, Spectrum) else _spectrum(kernel)
    values = np.sort(to_host(result.eigenvalues).reshape(-1))[::-1]
    fig, ax = _axes(ax)
    positive = values > 0
    ax.semilogy(np.arange(1, len(values) + 1)[positive], values[positive], marker=".", label=label)
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue")
    cond = result.condition_number
    ax.set_title(
        f"λ_max {result.lambda_max:.3g}, λ_min {result.lambda_min:.3g}, κ {cond:.3g}"
        if cond is not None
        else f"{len(values)} of {result.size} eigenvalues"
    )
    if label is not None:
        ax.legend()
    return fig


def kernel(kernel: Any, *, ax: Any = None, cmap: str = "viridis") -> Any:
    """The kernel as an image (flattened to (N1·O, N2·O) when it has output axes)."""
    _, matrix = square_matrix(kernel) if len(kernel.shape) != 2 else (None, kernel)
    fig, ax = _axes(ax)
    image = ax.imshow(to_host(matrix), cmap=cmap, interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("x2 (example, output)")
    ax.set_ylabel("x1 (example, output)")
    return fig
