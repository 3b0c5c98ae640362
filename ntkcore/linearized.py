"""The linearised model f_lin(θ, x) = f(θ₀, x) + J(x)·(θ − θ₀), by one jvp per call, and the
Taylor expansion of any degree, Σ_k D^k f(θ₀)[δ, …, δ] / k! with δ = θ − θ₀, by nested jvps.

Training the linearised model is what NTK theory predicts; comparing it (or the quadratic
expansion) with the real model shows how far a network is from the lazy regime. It stays a
callable of the model's own framework: its inputs and outputs are that framework's arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from .outputs import check_output, selected_apply
from .protocol import AutodiffBackend, PreparedModel
from .registry import detect_backend, get_backend


class Linearized:
    """``lin(x, params=None)``: the first-order Taylor model of ``model`` around θ₀.

    ``params`` is the point θ: ``None`` (θ₀), a ``name -> array`` map with the names of
    :attr:`params0`, the parameters in the form ``ntkcore.ntk(params=...)`` takes (a JAX
    pytree; for torch/Keras a map of replacement values), or a model of the same architecture
    (its trainable parameters). ``lin.model(x, params)`` evaluates the original, nonlinear f.
    """

    def __init__(
        self, model: Any, params: Any, backend: AutodiffBackend, output: Any = None, degree: int = 1, **prepare: Any
    ) -> None:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
            raise ValueError(f"degree must be an integer ≥ 0, got {degree!r}")
        self._model, self._backend, self.degree = model, backend, degree
        self._extra = {k: v for k, v in prepare.items() if v is not None}  # trainable=, state=: as given
        self._prepared: PreparedModel = backend.prepare(model, params, **self._extra)
        if output is not None:
            check_output(output)
            self._prepared = dataclasses.replace(self._prepared, apply=selected_apply(self._prepared.apply, output))
        if not self._prepared.params:
            raise ValueError("model has no trainable parameters to linearise around")
        self._like = next(iter(self._prepared.params.values()))
        self._linear = backend.jit(self._build())

    @property
    def params0(self) -> dict[str, Any]:
        """θ₀ as the ordered ``name -> array`` map of the trainable parameters."""
        return dict(self._prepared.params)

    def _build(self) -> Any:
        backend, apply, degree = self._backend, self._prepared.apply, self.degree

        def along(fn: Callable, delta: Any) -> Callable:
            return lambda p: backend.jvp(fn, p, delta)[1]

        def expanded(params0: Any, delta: Any, x: Any) -> Any:
            if degree == 1:  # one jvp gives f and its first-order term together
                out, tangent = backend.jvp(lambda p: apply(p, x), params0, delta)
                return out + tangent
            term = lambda p: apply(p, x)  # noqa: E731 - D^k f along delta, built up by nesting jvps
            total = term(params0)
            for k in range(1, degree + 1):
                term = along(term, delta)
                total = total + term(params0) / math.factorial(k)
            return total

        return expanded

    def _point(self, params: Any) -> dict[str, Any]:
        """θ as a ``name -> array`` map of the trainable parameters."""
        names = self._prepared.params
        if isinstance(params, Mapping) and set(params) == set(names):
            point = {k: self._backend.asarray(params[k], like=names[k]) for k in names}
        else:
            try:
                if not isinstance(params, Mapping) and self._backend.owns(params, None, ()):
                    point = dict(self._backend.prepare(params, None).params)  # a model of the same architecture
                else:
                    point = dict(self._backend.prepare(self._model, params, **self._extra).params)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"params: expected a map with the names {list(names)}, the model's parameters in the "
                    f"form ntkcore.ntk(params=...) takes, or a model of the same architecture ({error})"
                ) from None
        for k in names:
            if k not in point or tuple(point[k].shape) != tuple(names[k].shape):
                got = tuple(point[k].shape) if k in point else "nothing"
                raise ValueError(f"params[{k!r}] has shape {got}, expected {tuple(names[k].shape)}")
        return point

    def _input(self, x: Any) -> Any:
        try:
            return self._backend.asarray(x, like=self._like)
        except TypeError as error:
            raise TypeError(f"x: {error}") from None

    def __call__(self, x: Any, params: Any = None) -> Any:
        x = self._input(x)
        params0 = self._prepared.params
        point = params0 if params is None else self._point(params)
        delta = {k: point[k] - params0[k] for k in params0}
        return self._linear(params0, delta, x)

    def model(self, x: Any, params: Any = None) -> Any:
        """The original model f(θ, x) (θ as for a call)."""
        x = self._input(x)
        return self._prepared.apply(self._prepared.params if params is None else self._point(params), x)


def linearize(
    model: Any,
    params: Any = None,
    *,
    backend: str | None = None,
    output: Any = None,
    state: Any = None,
    trainable: Any = None,
) -> Linearized:
    """The linearised model of ``model`` around ``params`` (θ₀; as :func:`ntkcore.ntk`'s
    ``params=``: a JAX pytree, or for torch/Keras optional replacement values), of the output
    ``output=`` chooses; ``state=`` (a haiku ``transform_with_state`` model's state, constant)
    and ``trainable=`` as for :func:`ntkcore.ntk`."""
    adapter = get_backend(backend) if backend is not None else detect_backend(model, params, ())
    return Linearized(model, params, adapter, output, state=state, trainable=trainable)


def taylor_expand(
    model: Any,
    degree: int,
    params: Any = None,
    *,
    backend: str | None = None,
    output: Any = None,
    state: Any = None,
    trainable: Any = None,
) -> Linearized:
    """The Taylor expansion of ``model`` in its parameters around ``params`` (θ₀), to ``degree``:
    ``f(x, params=θ)`` = Σ_{k ≤ degree} D^k f(θ₀, x)[θ − θ₀]^k / k!, by nested jvps (degree 1 is
    :func:`linearize`; the cost grows as 2^degree forward passes). Options as for :func:`linearize`."""
    adapter = get_backend(backend) if backend is not None else detect_backend(model, params, ())
    return Linearized(model, params, adapter, output, degree, state=state, trainable=trainable)
