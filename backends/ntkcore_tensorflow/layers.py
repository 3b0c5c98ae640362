"""ntkcore's layers for Keras 3 models."""

from __future__ import annotations

from typing import Any

import keras


class FactorizedDense(keras.layers.Layer):
    """A low-rank Dense layer y = activation(x·U·V + b) (arXiv 2210.04807), W = U·V of rank ``rank``.

    Built from two ``Dense`` layers (``u``: no bias; ``v``: bias and activation), so structured
    derivatives treat it as two chained dense pieces and its cost scales with the rank.
    """

    def __init__(self, units: int, rank: int, activation: Any = None, use_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.units, self.rank = units, rank
        self.u = keras.layers.Dense(rank, use_bias=False, name="u", dtype=self.dtype_policy)
        self.v = keras.layers.Dense(units, activation=activation, use_bias=use_bias, name="v", dtype=self.dtype_policy)

    def build(self, input_shape: Any) -> None:
        self.u.build(input_shape)
        self.v.build((*input_shape[:-1], self.rank))

    def call(self, x: Any) -> Any:
        return self.v(self.u(x))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (*input_shape[:-1], self.units)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "units": self.units,
            "rank": self.rank,
            "activation": keras.activations.serialize(self.v.activation),
            "use_bias": self.v.use_bias,
        }
