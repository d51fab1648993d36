"""Shared test helpers: a shrunk config and a way to run the CLI in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from trainer import config as config_lib
from trainer import families, mapping, optim, parallel
from trainer import model as model_lib
from trainer import tasks as tasks_lib
from trainer import train_step as train_step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("smoke_config", os.path.join(REPO, "configs", "smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def small_config(**overrides) -> ml_collections.ConfigDict:
    """configs/smoke.py on one device (backend 'none'), 4 steps, no periodic evaluation: seconds of compute."""
    c = _smoke_config()
    c.train.num_steps = 4
    c.eval.every_steps = 0
    c.logging.every_steps = 1
    c.checkpoint.every_steps = 2
    c.parallel.backend = "none"
    return config_lib.with_fields(c, overrides)


def support_loss(model):
    """(params, (x, y)) -> the support MSE: the inner problem's loss built by hand (not by inner_solver)."""
    return lambda params, data: model_lib.mse_loss(model, params, *data)


def make_backend(config: ml_collections.ConfigDict, wrap_step=lambda step: step):
    """The config's backend (parallel.make_backend), the initial host TrainState and the training task key,
    built as train.py builds them; `wrap_step` wraps the bound train step (e.g. chex.assert_max_traces)."""
    family = families.get_family(config)
    model = family.make_model(config)
    keys = tasks_lib.split_keys(config.seed)
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
