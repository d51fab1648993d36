"""The models (a flax MLP for regression, a conv net for classification) and the losses built on them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

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


def image_patches(
    x_BxHxWxC: jax.Array, kernel_size: tuple[int, int], strides: int, padding: str
) -> jax.Array:
    """Each output position's receptive field, [B, H', W', kh * kw * C] ordered (row, column, channel).

    Padding as `jax.lax.conv_general_dilated`'s "SAME" (zeros, the odd one at the end) or "VALID". Built from
    kh * kw strided slices of the padded image: data movement only, so its gradient is cheap too.
    """
    (kh, kw), (_, h, w, _) = kernel_size, x_BxHxWxC.shape
    pads = jax.lax.padtype_to_pads((h, w), (kh, kw), (strides, strides), padding)
    x = jnp.pad(x_BxHxWxC, ((0, 0), *pads, (0, 0)))
    out_h = (x.shape[1] - kh) // strides + 1
    out_w = (x.shape[2] - kw) // strides + 1
    windows = [
        x[:, i : i + strides * (out_h - 1) + 1 : strides, j : j + strides * (out_w - 1) + 1 : strides, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(windows, axis=-1)


class PatchConv(nn.Module):
    """A 2-D convolution as image patches times a weight matrix: `nn.Conv`'s maths, parameters and init.

    `image_patches` gathers each output position's receptive field and one matmul with the kernel reshaped
    to [kh * kw * C, features] gives the output. The parameters are nn.Conv's (`kernel` [kh, kw, C,
    features], `bias` [features], same initialisers), so either implementation reads the other's checkpoints.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: int = 1
    padding: str = "SAME"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        channels = x_BxHxWxC.shape[-1]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, channels, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        patches = image_patches(x_BxHxWxC.astype(self.dtype), self.kernel_size, self.strides, self.padding)
        weights = kernel.reshape(-1, self.features).astype(self.dtype)
        return patches @ weights + bias.astype(self.dtype)


CONV_IMPLEMENTATIONS = {"xla": nn.Conv, "patches": PatchConv}


class ConvNet(nn.Module):
    """The MAML/iMAML few-shot classifier: `num_blocks` x [3x3 conv, stride 2; normalization; activation],
    the mean over the remaining spatial positions, then a linear head of `num_classes` logits.

    With 4 blocks of 64 filters on 28x28 images this is MAML's Omniglot network. Normalization is never
    batch norm with running statistics (state outside the parameters breaks the inner argmin):
      "layer"  statistics of each image over height, width and channels (per-channel scale and bias), so an
               image's logits do not depend on the other images of the batch (the default);
      "batch"  statistics over the current batch and spatial positions, without running averages (MAML's
               transductive batch norm: predictions depend on the batch they are made in);
      "none"   no normalization.
    `conv` picks the convolution's implementation (CONV_IMPLEMENTATIONS; the same maths and parameters).
    """

    num_classes: int
    width: int = 64
    num_blocks: int = 4
    normalization: str = "layer"
    activation: str = "relu"
    image_size: int = 28
    dtype: Any = jnp.float32
    conv: str = "xla"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.image_size, self.image_size, 1)

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        x = x_BxHxWxC
        for i in range(self.num_blocks):
            x = CONV_IMPLEMENTATIONS[self.conv](
                self.width,
                (3, 3),
                strides=2,
                padding="SAME",
                name=f"conv_{i}",
                dtype=self.dtype,
                param_dtype=self.dtype,
            )(x)
            if self.normalization != "none":
                # LayerNorm over the given axes with per-channel scale and bias; axis 0 (the batch) is
                # included for "batch".
                axes = (-3, -2, -1) if self.normalization == "layer" else (0, 1, 2)
                x = nn.LayerNorm(
                    reduction_axes=axes,
                    feature_axes=-1,
                    name=f"norm_{i}",
                    dtype=self.dtype,
                    param_dtype=self.dtype,
                )(x)
            x = act(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head", dtype=self.dtype, param_dtype=self.dtype)(x)


def dtype_of(config: ml_collections.ConfigDict) -> Any:
    return jnp.float64 if config.model.dtype == "float64" else jnp.float32


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The MLP for regression families, the conv net (one logit per way) for omniglot."""
    if config.tasks.family == "omniglot":
        return ConvNet(
            num_classes=config.tasks.num_ways,
            width=config.model.conv_width,
            num_blocks=config.model.conv_blocks,
            normalization=config.model.normalization,
            activation=config.model.activation,
            image_size=config.tasks.image_size,
            dtype=dtype_of(config),
            conv=config.model.conv_impl,
        )
    return MLP(
        features=tuple(config.model.hidden_sizes) + (1,),
        activation=config.model.activation,
        dtype=dtype_of(config),
    )


def init_params(model: nn.Module, key: jax.Array, input_dim: int = 1) -> Any:
    """Parameters of `model` for one input of its `input_shape` (conv net), else of `input_dim` features."""
    dtype = getattr(model, "dtype", jnp.float32)
    input_shape = getattr(model, "input_shape", (input_dim,))
    return model.init(key, jnp.zeros((1, *input_shape), dtype))


def mse_loss(model: nn.Module, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the model on one task's points."""
    return jnp.mean((model.apply(params, x) - y) ** 2)


def cross_entropy_loss(model: nn.Module, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the logits against integer labels y (one task's images)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y))


def accuracy(model: nn.Module, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of images whose largest logit is their label."""
    return jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == y).astype(jax.tree.leaves(params)[0].dtype)
