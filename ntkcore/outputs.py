"""Which output of the model the kernel is of: ``output=`` (a key or attribute name, or a
function of the model's output), or, without it, every array of a tuple/list/dict output, each
with its own kernel in the same structure (as neural-tangents does for pytree outputs).

An output object of another type (a transformers ``ModelOutput``, a dataclass) is refused
with a message that suggests ``output=``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from .compiled import lookup

_APPLIES: OrderedDict = OrderedDict()  # (apply, output) -> the apply that selects it: one per pair, so caches hit
_CONTAINERS = (tuple, list, dict)
Path = tuple[Any, ...]


class OutputChoiceError(ValueError):
    """``output=`` names a key or attribute the model's output does not have."""


class StructuredOutput(TypeError):
    """The model returns several arrays (a tuple, list or dict); ``paths`` locate them."""

    def __init__(self, message: str, probe: Any, paths: list[Path]) -> None:
        super().__init__(message)
        self.probe, self.paths = probe, paths


def check_output(output: Any) -> None:
    if output is not None and not isinstance(output, (str, int, tuple)) and not callable(output):
        raise TypeError(
            "output must be None, a key or attribute name (or index), a tuple of them (a path into nested "
            f"outputs), or a function of the model's output; got {output!r}"
        )


def _pick(value: Any, key: Any) -> Any:
    if isinstance(value, Mapping) or (isinstance(value, (tuple, list)) and isinstance(key, int)):
        try:
            return value[key]
        except (KeyError, IndexError):
            pass
    if isinstance(key, str) and hasattr(value, key):
        return getattr(value, key)
    keys = list(value.keys()) if isinstance(value, Mapping) else None
    raise OutputChoiceError(
        f"output={key!r}: the model's output ({type(value).__name__}) has no such key or attribute"
        + (f"; its keys are {keys}" if keys is not None else "")
    )


def selector(output: str | Callable | Path) -> Callable[[Any], Any]:
    """The function that takes the chosen array out of the model's output."""
    if callable(output):
        return output
    path = tuple(output) if isinstance(output, tuple) else (output,)

    def select(value: Any) -> Any:
        for key in path:
            value = _pick(value, key)
        return value

    return select


def selected_apply(apply: Callable, output: Any) -> Callable:
    """``apply`` followed by the ``output`` selection, the same function for the same pair."""
    key = (apply, output)

    def make() -> Callable:
        select = selector(output)
        return lambda params, x: select(apply(params, x))

    return lookup(_APPLIES, key, make)


def leaves(value: Any, path: Path = ()) -> list[Path]:
    """Paths of the arrays in a tuple/list/dict output (nested), in order."""
    if type(value) in _CONTAINERS or (isinstance(value, tuple) and hasattr(value, "_fields")):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return [p for key, item in items for p in leaves(item, (*path, key))]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return [path]
    raise TypeError(_suggestion(value, path))


def _suggestion(value: Any, path: Path) -> str:
    where = "" if not path else f" at {list(path)}"
    if isinstance(value, Mapping):
        keys = list(value.keys())
    else:
        keys = [k for k in getattr(value, "__dict__", {}) if not k.startswith("_")]
    example = next((k for k in ("logits", "last_hidden_state", *keys) if k in keys), None)
    hint = f" (e.g. output={example!r})" if example else ""
    return (
        f"model output{where} is a {type(value).__module__}.{type(value).__name__}, not an array: pass output= a "
        f"key or attribute name{hint} or a function of the output (output=lambda out: out.logits[:, -1]) to "
        "choose the array"
    )


def rebuild(value: Any, kernels: Mapping[Path, Any], path: Path = ()) -> Any:
    """The kernels in the structure of the model's output ``value``."""
    if path in kernels:
        return kernels[path]
    if isinstance(value, dict):
        return {key: rebuild(item, kernels, (*path, key)) for key, item in value.items()}
    items = [rebuild(item, kernels, (*path, i)) for i, item in enumerate(value)]
    return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
