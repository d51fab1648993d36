"""A training run read back from its workdir: the config saved with a checkpoint (completed by the defaults,
`config.from_saved`), its task family, model and meta-parameters. Used by the evaluation CLI (its K-shot
curves too) and by warm starts.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from trainer import checkpointing, executables, families, optim
from trainer import config as config_lib
from trainer import model as model_lib
from trainer import train_step as train_step_lib


class RunError(RuntimeError):
    """The workdir holds no run to read: no saved config, no checkpoint, or no such step."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of `DIR/config.json` (the last run's, for reading; evaluation uses the checkpoint's)."""
    path = checkpointing.config_path(workdir)
    saved = checkpointing.read_config(workdir)
    if saved is None:
        raise RunError(
            f"{path} does not exist: {workdir} is not a training workdir "
            "(train writes config.json when a run starts)"
        )
    return config_lib.from_saved(saved, path)


def checkpoint_config(
    workdir: str, reader: checkpointing.Checkpointer, step: int, warn
) -> ml_collections.ConfigDict:
    """The config saved with checkpoint `step`, the source of truth for its meta-parameters.

    A `config.json` that differs from it is reported (`warn`) and not used; a checkpoint written without
    a config (none of this trainer's) falls back to config.json.
    """
    saved = reader.saved_meta(step).get("config")
    path = checkpointing.config_path(workdir)
    if saved is None:
        warn(f"warning: checkpoint step {step} holds no config; using {path}")
        return load_config(workdir)
    on_disk = checkpointing.read_config(workdir)
    differing = checkpointing.differing_fields(on_disk, saved) if on_disk is not None else []
    if differing:
        fields = "; ".join(f"{name} (config.json {a!r}, checkpoint {b!r})" for name, a, b in differing)
        warn(
            f"warning: {path} differs from the config saved with checkpoint step {step} in "
            f"{len(differing)} field(s): {fields}; evaluating with the checkpoint's config"
        )
    return config_lib.from_saved(saved, f"the config of checkpoint step {step} in {reader.directory}")


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Run(NamedTuple):
    """A checkpoint of a run, read back with the config saved inside it."""

    config: ml_collections.ConfigDict
    family: Any
    model: Any
    meta_params: Any
    step: int


def load_run(workdir: str, step: int | str | None, num_tasks: int | None, warn=_warn) -> Run:
    """The config saved with checkpoint `step` (the latest when None, the best by the run's
    checkpoint.best_metric when "best"; eval.num_tasks = num_tasks if given), its model, and its
    meta-parameters."""
    if not os.path.isdir(workdir):
        raise RunError(f"workdir {workdir} does not exist")
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        if checkpointing.read_config(workdir) is None:
            raise RunError(
                f"{workdir} is not a training workdir: it has neither checkpoints/ nor config.json "
                "(training writes both)"
            )
        raise RunError(f"no checkpoints in {workdir}: {directory} does not exist")
    if num_tasks is not None and num_tasks < 1:
        raise RunError(f"--num_tasks must be >= 1, got {num_tasks}")
    with checkpointing.Checkpointer(workdir) as reader:
        steps = reader.all_steps()
        if not steps:
            raise RunError(
                f"no checkpoints in {directory} (training saves one every checkpoint.every_steps and at the end)"
            )
        if step == "best":
            latest = reader.saved_meta(max(steps)).get("config") or {}
            best = latest.get("checkpoint", {})
            if not best.get("best_metric"):
                raise RunError(
                    f"--step=best: the run in {workdir} kept no best checkpoint (its checkpoint.best_metric "
                    "is empty); give a step number"
                )
            step = reader.best_step(best["best_metric"], best.get("best_mode", "min"))
            warn(f"--step=best: step {step}, the best {best['best_metric']} ({best.get('best_mode', 'min')})")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise RunError(f"no checkpoint of step {step} in {directory}; available steps: {steps}")
        config = checkpoint_config(workdir, reader, step, warn)
        if num_tasks is not None:
            config.eval.num_tasks = num_tasks
        executables.configure_jax(config)
        family = families.get_family(config)
        model = family.make_model(config)
        keys = families.split_keys(config.seed)
        optimizer, _ = optim.make_optimizer(config)
        template = jax.tree.map(
            np.asarray,
            train_step_lib.create_train_state(
                model_lib.init_params(model, keys["init"]), optimizer, keys["train"]
            ),
        )
        host_state = reader.restore(step, template)
    return Run(config, family, model, host_state.meta_params, int(step))
