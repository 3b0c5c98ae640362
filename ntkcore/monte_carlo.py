"""The NTK averaged over random initialisations (neural-tangents' ``monte_carlo_kernel_fn``):
each sample is a freshly initialised model, built by the user's own factory in their framework."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .api import ntk


def _sample(model_factory: Callable[[int], Any], seed: int, x1: Any, x2: Any, options: dict) -> Any:
    built = model_factory(seed)
    model, params = built if isinstance(built, tuple) and len(built) == 2 else (built, None)
    return ntk(model, x1, x2, params=params, **options)


def _counts(n_samples: Iterable[int]) -> list[int]:
    counts = sorted({int(n) for n in n_samples})
    if not counts or counts[0] < 1:
        raise ValueError(f"n_samples must be positive sample counts, got {list(n_samples)!r}")
    return counts


def _running(model_factory: Callable, x1: Any, x2: Any, counts: list[int], seed: int, options: dict) -> Iterator[Any]:
    total, done = None, 0
    for count in counts:
        while done < count:
            kernel = _sample(model_factory, seed + done, x1, x2, options)
            total = kernel if total is None else total + kernel
            done += 1
        yield total / done


def monte_carlo(
    model_factory: Callable[[int], Any],
    x1: Any,
    x2: Any = None,
    *,
    n_samples: int | Iterable[int] = 1,
    seed: int = 0,
    **ntk_options: Any,
) -> Any:
    """The mean of ``ntk(model_factory(seed + i), x1, x2)`` over ``i < n_samples``.

    ``model_factory(seed)`` returns a freshly initialised model (torch, Keras) or ``(apply,
    params)`` (JAX). With an iterable ``n_samples`` (e.g. ``[1, 10, 100]``), a generator of the
    running averages after each count, computed incrementally. Other options as for
    :func:`ntkcore.ntk` (``params=`` comes from the factory).
    """
    if "params" in ntk_options:
        raise TypeError("params= comes from model_factory, which returns (apply, params) for a JAX model")
    if isinstance(n_samples, Iterable):
        return _running(model_factory, x1, x2, _counts(n_samples), seed, ntk_options)
    return next(_running(model_factory, x1, x2, _counts([n_samples]), seed, ntk_options))
