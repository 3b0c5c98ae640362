"""Parameters added to activations by broadcasting, outside any layer with a rule: a learned
position table (``x + self.position_embeddings``), a class token
(``self.cls_token.expand(n, -1, -1)``), a bias added by hand. Each such use is a call of an
embedding layer whose table is the parameter seen as (rows, features) and whose ids say which
row every output token reads — exact, because y = broadcast(p) + (terms without p).

A parameter of a module without a rule becomes a candidate; any other use of it (a matmul, a
slice) is reported to the audit, and the parameter falls back as before.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_EXPANDS = {torch.Tensor.expand, torch.Tensor.expand_as}


def broadcast_ids(param_shape: tuple[int, ...], out_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """(1, S) ids of the parameter's rows that the S tokens of an output of ``out_shape`` (a batch
    of one, features last) read; ``None`` where the use is no broadcast over tokens (a batch axis
    in the parameter, features broadcast, a shape that does not align)."""
    if len(out_shape) < 2 or out_shape[0] != 1 or len(param_shape) > len(out_shape):
        return None
    shape = (1,) * (len(out_shape) - len(param_shape)) + tuple(param_shape)
    if shape[-1] != out_shape[-1] or any(p not in (1, o) for p, o in zip(shape, out_shape)):
        return None
    rows = math.prod(shape[1:-1])
    ids = torch.arange(rows, device=like.device).reshape(shape[1:-1]).expand(out_shape[1:-1])
    return ids.reshape(1, -1)


def operand(
    func: Any, args: tuple, kwargs: dict, names: dict[int, str], layers: dict[str, str]
) -> tuple[str, torch.Tensor] | None:
    """The candidate parameter (name, tensor) this call broadcasts, if it is one of the forms above."""
    if func in _EXPANDS:
        tensors = args[:1]
    elif func in _ADDS and not kwargs and len(args) == 2:
        tensors = args
    else:
        return None
    found = [(names[id(t)], t) for t in tensors if isinstance(t, torch.Tensor) and id(t) in names]
    return found[0] if len(found) == 1 and found[0][0] in layers else None
