"""A minimal array-API shim over TensorFlow: the functions the core calls, nothing more.

array-api-compat does not cover TensorFlow, so the adapter's ``namespace`` returns this
module. Native ``tf.Tensor`` indexing already covers the slicing the core uses
(``[..., ::k]``, ``[None, ...]``, ``[0, ...]``, ``[:1]``). ``device=`` is accepted and
ignored: TensorFlow places tensors itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

__all__ = [
    "abs",
    "all",
    "astype",
    "concat",
    "exp",
    "expm1",
    "eye",
    "isfinite",
    "linalg",
    "log",
    "matmul",
    "max",
    "min",
    "ones",
    "permute_dims",
    "reshape",
    "sqrt",
    "stack",
    "sum",
    "take",
    "where",
    "zeros",
]


def _shape(shape: Sequence[int]) -> Any:
    # an empty tuple would convert to a float tensor; the shape must be integer
    return tf.constant([int(d) for d in shape], dtype=tf.int64) if len(shape) == 0 else [int(d) for d in shape]


def reshape(x: Any, /, shape: Sequence[int], *, copy: bool | None = None) -> tf.Tensor:
    return tf.reshape(x, _shape(shape))


def permute_dims(x: Any, /, axes: Sequence[int]) -> tf.Tensor:
    return tf.transpose(x, perm=[int(a) for a in axes])


def take(x: Any, indices: Any, /, *, axis: int | None = None) -> tf.Tensor:
    return tf.gather(tf.reshape(x, (-1,)) if axis is None else x, indices, axis=0 if axis is None else axis)


def matmul(x1: Any, x2: Any, /) -> tf.Tensor:
    return tf.linalg.matmul(x1, x2)


def sum(x: Any, /, *, axis: int | Sequence[int] | None = None, dtype: Any = None, keepdims: bool = False) -> tf.Tensor:
    if dtype is not None:
        x = tf.cast(x, dtype)
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def eye(n_rows: int, n_cols: int | None = None, /, *, k: int = 0, dtype: Any = None, device: Any = None) -> tf.Tensor:
    if k != 0:
        raise NotImplementedError("the TensorFlow shim's eye supports only k=0")
    return tf.eye(int(n_rows), None if n_cols is None else int(n_cols), dtype=dtype or tf.float32)


def zeros(shape: Sequence[int], *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    return tf.zeros([int(d) for d in shape], dtype=dtype or tf.float32)


def ones(shape: Sequence[int], *, dtype: Any = None, device: Any = None) -> tf.Tensor:
    return tf.ones([int(d) for d in shape], dtype=dtype or tf.float32)


def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> tf.Tensor:
    return tf.cast(x, dtype)


def concat(arrays: Sequence[Any], /, *, axis: int | None = 0) -> tf.Tensor:
    return tf.concat(list(arrays), axis=axis)


def stack(arrays: Sequence[Any], /, *, axis: int = 0) -> tf.Tensor:
    return tf.stack(list(arrays), axis=axis)


def all(x: Any, /, *, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> tf.Tensor:
    return tf.reduce_all(tf.cast(x, tf.bool), axis=axis, keepdims=keepdims)


def isfinite(x: Any, /) -> tf.Tensor:
    return tf.math.is_finite(x)


def max(x: Any, /, *, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> tf.Tensor:
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


def min(x: Any, /, *, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> tf.Tensor:
    return tf.reduce_min(x, axis=axis, keepdims=keepdims)


def where(condition: Any, x1: Any, x2: Any, /) -> tf.Tensor:
    return tf.where(condition, x1, x2)


abs = tf.abs
exp = tf.exp
expm1 = tf.math.expm1
log = tf.math.log
sqrt = tf.sqrt


class linalg:
    """The array API ``linalg`` functions the analysis tools (spectrum, predictions) and the
    readout reduction (qr) use."""

    eigh = staticmethod(lambda x, /: tuple(tf.linalg.eigh(x)))
    eigvalsh = staticmethod(lambda x, /: tf.linalg.eigvalsh(x))
    solve = staticmethod(lambda x1, x2, /: tf.linalg.solve(x1, x2))
    qr = staticmethod(lambda x, /, *, mode="reduced": tuple(tf.linalg.qr(x, full_matrices=mode == "complete")))
