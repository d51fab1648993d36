"""Shared test helpers: a shrunk config and a way to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections

from trainer import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides) -> ml_collections.ConfigDict:
    """configs/smoke.py on one device (backend 'none'), float64: a few seconds of compute."""
    c = config_lib.default_config()
    c.model.hidden_sizes = (8, 8)
    c.inner.l2reg = 1.0
    c.inner.maxiter = 50
    c.inner.tol = 1e-6
    c.meta_grad.solver_maxiter = 50
    c.outer.learning_rate = 1e-2
    c.train.num_steps = 4
    c.train.meta_batch_size = 8
    c.eval.every_steps = 0
    c.eval.num_tasks = 8
    c.logging.every_steps = 1
    c.checkpoint.every_steps = 2
    c.parallel.backend = "none"
    for name, value in overrides.items():
        node = c
        *groups, field = name.split(".")
        for g in groups:
            node = node[g]
        node[field] = value
    return config_lib.validate(c)


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
