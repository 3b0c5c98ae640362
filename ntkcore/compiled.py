"""What repeated calls share: compiled kernels, layer captures and ``auto``'s choices.

Keyed by the identity of the adapter's ``apply``: adapters that return the same ``apply`` for
the same model (and constants) let repeated ``ntk()`` calls skip recompilation. Parameters and
inputs are arguments of the compiled function, never baked in. Each cache keeps the most
recent ``SIZE`` entries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from .arrays import layers_of
from .contraction import contract
from .implementations import KernelCall, Method

SIZE = 64
_COMPILED: OrderedDict = OrderedDict()
_CAPTURES: OrderedDict = OrderedDict()  # -> [capture, whether its fallbacks were warned about]
_CHOICES: OrderedDict = OrderedDict()  # auto's choice per model, shapes and options
_PROBED: OrderedDict = OrderedDict()  # f's per-example output shape (probed, checked) per model and input shape
_FAILED: OrderedDict = OrderedDict()  # implementations that raised on a model and input shape -> why


def lookup(cache: OrderedDict, key: Hashable, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` on a miss; the oldest entries beyond ``SIZE`` go."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    cache[key] = value = make()
    while len(cache) > SIZE:
        cache.popitem(last=False)
    return value


def nngp_kernel(call: KernelCall, params: Mapping[str, Any], x1: Any, x2: Any) -> Any:
    """f(x1)·f(x2)ᵀ with the kernel's axis conventions."""
    f1 = {"f": call.apply(params, x1)[..., None]}
    f2 = f1 if x2 is None else {"f": call.apply(params, x2)[..., None]}
    return contract(call.backend.namespace(x1), f1, f2, call.axes, *call.shapes(x1, x2))


def _build(call: KernelCall, method: Method | None, per_layer: bool) -> Callable:
    """The kernel computation for one set of static options (``method=None``: the NNGP kernel)."""

    def compute(params: Mapping[str, Any], x1: Any, x2: Any = None) -> Any:
        if method is None:
            return nngp_kernel(call, params, x1, x2)
        if per_layer:
            return method.per_layer(call, params, x1, x2, layers_of(params))
        return method.kernel(call, params, x1, x2)

    return compute


def compiled_kernel(call: KernelCall, method: Method | None, *, reuse: bool, per_layer: bool) -> Callable:
    """The compiled kernel for this call's setting, shared by every call that has it."""
    key = (call, None if method is None else method.key, reuse, per_layer)
    if method is not None and not method.compiled:  # it compiles its own parts
        return lookup(_COMPILED, key, lambda: _build(call, method, per_layer))
    return lookup(_COMPILED, key, lambda: call.backend.jit(_build(call, method, per_layer)))
