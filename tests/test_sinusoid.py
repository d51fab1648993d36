"""The sinusoid family's tasks (trainer/sinusoid.py, families.Sinusoid): shapes, determinism, independence of the device split, fixed pools."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tests import helpers
from trainer import config as config_lib
from trainer import families


def _sample(tasks_cfg, key, step, task_indices, dtype=jnp.float32):
    """The tasks as training samples them (families.Sinusoid.sample, the trainer's path)."""
    return families.Sinusoid(ml_collections.ConfigDict({"tasks": tasks_cfg})).sample(
        None, key, step, task_indices, dtype
    )


def test_shapes_and_ranges():
    cfg = config_lib.default_config().tasks
    batch = _sample(cfg, jax.random.PRNGKey(0), 3, jnp.arange(5), jnp.float64)
    assert batch["support_x"].shape == (5, cfg.num_support, 1)
    assert batch["query_y"].shape == (5, cfg.num_query, 1)
    assert batch["support_x"].dtype == jnp.float64
    assert np.all((batch["amplitude"] >= cfg.amplitude_min) & (batch["amplitude"] <= cfg.amplitude_max))
    assert np.all((batch["query_x"] >= cfg.x_min) & (batch["query_x"] <= cfg.x_max))
    expected = batch["amplitude"][:, None, None] * np.sin(
        batch["frequency"][:, None, None] * batch["support_x"] + batch["phase"][:, None, None]
    )
    np.testing.assert_allclose(batch["support_y"], expected, rtol=1e-12)


def test_task_depends_only_on_step_and_global_index():
    """Sampling slices of the index range (as devices do) gives the same tasks as sampling all at once."""
    cfg = config_lib.default_config().tasks
    key = jax.random.PRNGKey(1)
    whole = _sample(cfg, key, 7, jnp.arange(8))
    parts = [_sample(cfg, key, 7, jnp.arange(i, i + 2)) for i in range(0, 8, 2)]
    for name in whole:
        np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]))
    other_step = _sample(cfg, key, 8, jnp.arange(8))
    assert not np.allclose(whole["support_x"], other_step["support_x"])


def test_fixed_pool_repeats_across_steps_and_heldout_is_disjoint():
    cfg = config_lib.default_config().tasks
    cfg.num_fixed_train_tasks = 3
    keys = families.split_keys(0)
    a = _sample(cfg, keys["train"], 0, jnp.arange(3))
    b = _sample(cfg, keys["train"], 5, jnp.arange(3))
    np.testing.assert_array_equal(a["support_x"], b["support_x"])
    held = helpers.sinusoid_heldout(cfg, keys["eval"], 3)
    assert not np.any(np.isin(np.asarray(held["amplitude"]), np.asarray(a["amplitude"])))
