"""The conv net's two convolution implementations: the same parameters, logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from trainer import model as model_lib


def _nets(**fields):
    kw = {"num_classes": 5, "width": 16, "num_blocks": 4, "image_size": 28, "dtype": jnp.float32, **fields}
    return model_lib.ConvNet(conv="xla", **kw), model_lib.ConvNet(conv="patches", **kw)


@pytest.mark.parametrize("normalization", ["layer", "none"])
def test_patch_conv_equals_flax_conv_in_float32(normalization):
    xla, patches = _nets(normalization=normalization)
    key = jax.random.PRNGKey(0)
    params = model_lib.init_params(xla, key)
    same_init = model_lib.init_params(patches, key)
    assert jax.tree.structure(params) == jax.tree.structure(same_init)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same_init), strict=True):
        np.testing.assert_array_equal(a, b)  # The same names, shapes and initialisers.

    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 28, 28, 1), jnp.float32)
    y = jnp.arange(5)
    logits_xla, logits_patches = xla.apply(params, x), patches.apply(params, x)
    np.testing.assert_allclose(logits_patches, logits_xla, rtol=1e-4, atol=1e-5)
    grad = lambda net: ravel_pytree(jax.grad(lambda p: model_lib.cross_entropy_loss(net, p, x, y))(params))[0]
    g_xla, g_patches = grad(xla), grad(patches)
    assert float(jnp.linalg.norm(g_patches - g_xla) / jnp.linalg.norm(g_xla)) < 1e-4


def test_patch_conv_vmapped_over_tasks_with_their_own_weights():
    """Under vmap each task convolves with its own kernel (the inner solves' parameters differ)."""
    xla, patches = _nets(normalization="layer", num_blocks=2)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    params_T = jax.vmap(lambda k: model_lib.init_params(xla, k))(keys)
    x_T = jax.random.uniform(jax.random.PRNGKey(3), (3, 5, 28, 28, 1), jnp.float32)
    out_xla = jax.vmap(xla.apply)(params_T, x_T)
    out_patches = jax.vmap(patches.apply)(params_T, x_T)
    np.testing.assert_allclose(out_patches, out_xla, rtol=1e-4, atol=1e-5)
    for t in range(3):
        one = jax.tree.map(lambda a, t=t: a[t], params_T)
        np.testing.assert_allclose(out_xla[t], xla.apply(one, x_T[t]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "size,strides,padding", [(28, 2, "SAME"), (7, 2, "SAME"), (9, 1, "SAME"), (8, 2, "VALID")]
)
def test_image_patches_equal_xla_patches(size, strides, padding):
    """The strided-slice patches are lax.conv_general_dilated_patches' ([C, kh, kw]-ordered) up to the order
    of the features, at even and odd sizes, strides 1 and 2, SAME and VALID padding; bitwise (no arithmetic)."""
    x = jax.random.normal(jax.random.PRNGKey(4), (2, size, size, 3), jnp.float32)
    ours = model_lib.image_patches(x, (3, 3), strides, padding)
    ref = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (strides, strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    ref = (
        ref.reshape(*ref.shape[:3], 3, 3, 3).transpose(0, 1, 2, 4, 5, 3).reshape(ref.shape)
    )  # -> (kh, kw, C)
    np.testing.assert_array_equal(ours, ref)
