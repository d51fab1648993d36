"""Orbax checkpoints of the train state in `<workdir>/checkpoints`, and the resolved config beside them.

The state is saved as host (numpy) arrays: it is replicated and small, and a numpy checkpoint restores
onto any device count or backend (the backend replicates it again). Orbax writes each step to a
temporary directory and renames it when complete, so a step interrupted mid-save is never listed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from trainer import config as config_lib


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, unreadable, or written by an incompatible config."""


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = config_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(config_lib.to_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, config_path(workdir))


def read_config(workdir: str) -> dict[str, Any] | None:
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the saved config {path}: {e}") from e


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def differing_maths_fields(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
    """Fields that change the optimisation problem and differ between the saved and the current config."""
    saved_flat, current_flat = _flat(saved), _flat(config_lib.to_dict(current))
    return [f"{name} (saved {saved_flat.get(name)!r}, now {current_flat.get(name)!r})"
            for name in config_lib.maths_fields() if saved_flat.get(name) != current_flat.get(name)]


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` saving host-side train states."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        ck = config.checkpoint
        options = ocp.CheckpointManagerOptions(max_to_keep=ck.max_to_keep, create=True,
                                               enable_async_checkpointing=ck.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, host_state: Any, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.StandardSave(host_state), force=force)

    def restore(self, step: int, template: Any) -> Any:
        """Restores `step` into the structure of `template` (host arrays); clear error if unreadable."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax raises many types for damaged files.
            raise CheckpointError(
                f"checkpoint step {step} in {os.path.join(self.directory, str(step))} cannot be restored "
                f"({type(e).__name__}: {e}); choose another step with --restore_step "
                f"(available: {self.all_steps()})") from e
        return jax.tree.map(np.asarray, restored)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
