"""Shared test helpers: a shrunk config and a way to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import smoke
from trainer import config as config_lib
from trainer import families, mapping, optim, parallel, sinusoid
from trainer import model as model_lib
from trainer import train_step as train_step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides) -> ml_collections.ConfigDict:
    """configs/smoke.py on one device (backend 'none'), 4 steps, no periodic evaluation: seconds of compute."""
    c = smoke.get_config()
    c.train.num_steps = 4
    c.eval.every_steps = 0
    c.logging.every_steps = 1
    c.checkpoint.every_steps = 2
    c.parallel.backend = "none"
    return config_lib.with_fields(c, overrides)


def sinusoid_tasks(tasks_cfg, base_key, step, task_indices, dtype=jnp.float32):
    """Reference sampler: sinusoid tasks of a step by their global indices, from the documented key rule
    (fold_in(fold_in(key, step), i); fold_in(key, i mod pool) for a fixed pool), not the family's code."""
    if tasks_cfg.num_fixed_train_tasks:
        step_key, task_indices = base_key, task_indices % tasks_cfg.num_fixed_train_tasks
    else:
        step_key = jax.random.fold_in(base_key, step)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, task_indices)
    return jax.vmap(lambda k: sinusoid.sample_task(k, tasks_cfg, dtype))(keys)


def sinusoid_heldout(tasks_cfg, eval_key, num_tasks, dtype=jnp.float32):
    """Reference held-out sinusoid tasks 0..num_tasks-1: fold_in(eval_key, i), never from a fixed pool."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(eval_key, jnp.arange(num_tasks))
    return jax.vmap(lambda k: sinusoid.sample_task(k, tasks_cfg, dtype))(keys)


def support_loss(model):
    """(params, (x, y)) -> the support MSE: the inner problem's loss built by hand (not by inner_solver)."""
    return lambda params, data: model_lib.mse_loss(model, params, *data)


def make_backend(config: ml_collections.ConfigDict, wrap_step=lambda step: step):
    """The config's backend (parallel.make_backend), the initial host TrainState and the training task key,
    built as train.py builds them; `wrap_step` wraps the bound train step (e.g. chex.assert_max_traces)."""
    family = families.get_family(config)
    model = family.make_model(config)
    keys = families.split_keys(config.seed)
    optimizer, _ = optim.make_optimizer(config)
    local_step = train_step_lib.make_train_step(
        config, model, family, optimizer, mapping.task_mapping(config)
    )
    backend = parallel.make_backend(config, wrap_step(local_step), family, family.load_data(config).train)
    init = model_lib.init_params(model, keys["init"])
    host_state = jax.tree.map(np.asarray, train_step_lib.create_train_state(init, optimizer, keys["train"]))
    return backend, host_state, keys["train"]


def run_cli(
    args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 600, num_devices: int = 1
) -> subprocess.CompletedProcess:
    """Runs `python -m trainer.main ARGS` with `num_devices` simulated CPU devices; returns the process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "trainer.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
