"""The outer optimizer built from config.outer: each schedule's values, Adam's epsilon, AdamW's decay, clipping."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import helpers
from trainer import optim


def _config(**outer):
    return helpers.small_config(**{f"outer.{k}": v for k, v in outer.items()}, **{"train.num_steps": 100})


def _update(config, grads, params):
    tx, _ = optim.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_schedules_at_known_steps():
    lr = 0.01
    constant = optim.learning_rate_schedule(_config(learning_rate=lr).outer, 100)
    cosine = optim.learning_rate_schedule(_config(learning_rate=lr, schedule="cosine").outer, 100)
    warm = optim.learning_rate_schedule(
        _config(learning_rate=lr, schedule="warmup_cosine", warmup_steps=10).outer, 100
    )
    assert [float(constant(s)) for s in (0, 50, 100)] == pytest.approx([lr, lr, lr])
    assert [float(cosine(s)) for s in (0, 50, 100)] == pytest.approx([lr, lr / 2, 0.0], abs=1e-12)
    # Linear warm-up from 0 to the peak over 10 steps, then a cosine to 0 at num_steps.
    assert [float(warm(s)) for s in (0, 5, 10, 100)] == pytest.approx([0.0, lr / 2, lr, 0.0], abs=1e-12)
    assert float(warm(55)) == pytest.approx(lr / 2, rel=1e-6)


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_adam_uses_the_configured_epsilon(eps):
    """The first Adam update is -lr g / (|g| + eps): about lr for every parameter at eps 1e-8, damped for
    gradients not much larger than eps."""
    params, grads = {"w": jnp.zeros(3)}, {"w": jnp.array([1e-4, 1e-2, 1.0])}
    updates = _update(_config(learning_rate=0.1, adam_eps=eps), grads, params)
    expected = -0.1 * grads["w"] / (jnp.abs(grads["w"]) + eps)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-6)
    reference, _ = optax.adam(0.1, eps=eps).update(grads, optax.adam(0.1, eps=eps).init(params), params)
    np.testing.assert_allclose(updates["w"], reference["w"], rtol=1e-12)


def test_adamw_decays_the_parameters_and_sgd_steps_along_the_gradient():
    params, zero = {"w": jnp.array([2.0, -4.0])}, {"w": jnp.zeros(2)}
    updates = _update(_config(optimizer="adamw", learning_rate=0.1, weight_decay=0.5), zero, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"])  # No gradient: decay only.
    grads = {"w": jnp.array([1.0, 3.0])}
    np.testing.assert_allclose(
        _update(_config(optimizer="sgd", learning_rate=0.1), grads, params)["w"], [-0.1, -0.3]
    )


def test_clipping_bounds_the_global_norm_of_the_gradient():
    params, grads = {"w": jnp.zeros(2)}, {"w": jnp.array([3.0, 4.0])}  # Norm 5.
    clipped = _update(_config(optimizer="sgd", learning_rate=1.0, grad_clip_norm=1.0), grads, params)
    np.testing.assert_allclose(clipped["w"], [-0.6, -0.8])
    unclipped = _update(_config(optimizer="sgd", learning_rate=1.0, grad_clip_norm=10.0), grads, params)
    np.testing.assert_allclose(unclipped["w"], [-3.0, -4.0])
