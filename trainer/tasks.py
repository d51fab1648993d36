"""Task families: pure, jittable functions of a key that return batches of few-shot tasks.

A task batch is a dict of arrays with a leading task axis:
  support_x [T, K, 1], support_y [T, K, 1], query_x [T, Q, 1], query_y [T, Q, 1].
Task `i` of step `s` is drawn from `fold_in(fold_in(train_key, s), i)` (or `fold_in(train_key, i)` for a fixed
pool), so which tasks a step sees does not depend on how the batch is split across devices or processes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

TaskBatch = dict[str, jax.Array]


def sample_sinusoid_task(key: jax.Array, cfg: ml_collections.ConfigDict, dtype: Any) -> TaskBatch:
    """One task y = amplitude * sin(frequency * x + phase), support and query x uniform in [x_min, x_max]."""
    k_amp, k_freq, k_phase, k_support, k_query = jax.random.split(key, 5)
    uniform = functools.partial(jax.random.uniform, dtype=dtype)
    amplitude = uniform(k_amp, minval=cfg.amplitude_min, maxval=cfg.amplitude_max)
    frequency = uniform(k_freq, minval=cfg.frequency_min, maxval=cfg.frequency_max)
    phase = uniform(k_phase, minval=cfg.phase_min, maxval=cfg.phase_max)
    support_x = uniform(k_support, (cfg.num_support, 1), minval=cfg.x_min, maxval=cfg.x_max)
    query_x = uniform(k_query, (cfg.num_query, 1), minval=cfg.x_min, maxval=cfg.x_max)
    curve = lambda x: amplitude * jnp.sin(frequency * x + phase)
    return dict(
        support_x=support_x,
        support_y=curve(support_x),
        query_x=query_x,
        query_y=curve(query_x),
        amplitude=amplitude,
        frequency=frequency,
        phase=phase,
    )


def task_keys(
    base_key: jax.Array, step: jax.Array | int, task_indices: jax.Array, num_fixed_tasks: int = 0
) -> jax.Array:
    """Keys of the given tasks of a step: fold_in(fold_in(key, step), i), or fold_in(key, i) for a fixed pool."""
    if num_fixed_tasks:
        step_key = base_key
        task_indices = task_indices % num_fixed_tasks
    else:
        step_key = jax.random.fold_in(base_key, step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, task_indices)


def sample_tasks(
    tasks_cfg: ml_collections.ConfigDict,
    base_key: jax.Array,
    step: jax.Array | int,
    task_indices: jax.Array,
    dtype: Any = jnp.float32,
) -> TaskBatch:
    """The tasks with the given global indices of a step; pure and jittable (runs on whichever device calls it)."""
    if tasks_cfg.family != "sinusoid":
        raise ValueError(f"unknown task family {tasks_cfg.family!r}")
    keys = task_keys(base_key, step, task_indices, tasks_cfg.num_fixed_train_tasks)
    return jax.vmap(lambda k: sample_sinusoid_task(k, tasks_cfg, dtype))(keys)


def heldout_tasks(
    tasks_cfg: ml_collections.ConfigDict, eval_key: jax.Array, num_tasks: int, dtype: Any = jnp.float32
) -> TaskBatch:
    """Held-out tasks: fresh draws from a key disjoint from training (never from a fixed training pool)."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(eval_key, jnp.arange(num_tasks))
    return jax.vmap(lambda k: sample_sinusoid_task(k, tasks_cfg, dtype))(keys)


def split_keys(seed: int) -> dict[str, jax.Array]:
    """Disjoint keys for model init, training tasks and held-out tasks (raw uint32 key data)."""
    base = jax.random.PRNGKey(seed)
    return dict(
        init=jax.random.fold_in(base, 0), train=jax.random.fold_in(base, 1), eval=jax.random.fold_in(base, 2)
    )


def support(batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
    return batch["support_x"], batch["support_y"]


def query(batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
    return batch["query_x"], batch["query_y"]
