"""The regression model (a flax MLP) and the per-task losses built on it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish,
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
}


class MLP(nn.Module):
    """Dense layers of the given widths with an activation between them; the last layer is linear."""

    features: Sequence[int]
    activation: str = "swish"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.features):
            x_BxD = nn.Dense(width, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.dtype)(x_BxD)
            if i != len(self.features) - 1:
                x_BxD = act(x_BxD)
        return x_BxD


def dtype_of(config: ml_collections.ConfigDict) -> Any:
    return jnp.float64 if config.model.dtype == "float64" else jnp.float32


def make_model(config: ml_collections.ConfigDict) -> MLP:
    return MLP(features=tuple(config.model.hidden_sizes) + (1,), activation=config.model.activation,
               dtype=dtype_of(config))


def init_params(model: nn.Module, key: jax.Array, input_dim: int = 1) -> Any:
    """Parameters of `model` for inputs of `input_dim` features."""
    dtype = getattr(model, "dtype", jnp.float32)
    return model.init(key, jnp.zeros((1, input_dim), dtype))


def mse_loss(model: nn.Module, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the model on one task's points."""
    return jnp.mean((model.apply(params, x) - y) ** 2)
