"""Orbax checkpoints of the train state in `<workdir>/checkpoints`, resume, and preemption.

Each step directory holds two items: `state` (the TrainState as host numpy arrays: step, meta-parameters,
optax state and the raw task key, which is all the next step depends on, since step s draws its tasks
from fold_in(task_key, s)) and `meta` (JSON: the resolved config and where it was written). The resolved
config is also kept readable in `<workdir>/config.json`.

Host arrays restore onto any device count or backend: the backend replicates them again.
Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a save cut short
by a crash is never listed as a step. Nothing is deleted except by `checkpoint.max_to_keep`; resuming from
an earlier step (`--restore_step`) moves the later steps to `<workdir>/checkpoints_superseded/`.

Preemption: SIGTERM or SIGINT make the loop save the current step, wait for it and raise `Preempted`; the
CLI then exits with `PREEMPTED_EXIT_STATUS`. With several processes, all agree on the step through
`jax.experimental.multihost_utils.reached_preemption_sync_point` (JAX's own SIGTERM notifier).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from trainer import config as config_lib
from trainer import workdir as workdir_lib

PREEMPTED_EXIT_STATUS = workdir_lib.PREEMPTED_EXIT_STATUS
SUPERSEDED_DIR = "checkpoints_superseded"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, unreadable, or written by an incompatible config."""


class Preempted(Exception):  # noqa: N818 -- not an error: the run stopped on request after saving.
    """Training stopped on SIGTERM/SIGINT after checkpointing `step`; rerunning the command resumes."""

    def __init__(self, step: int, reason: str, checkpoint_dir: str, saved: bool = True):
        self.step, self.reason, self.checkpoint_dir = step, reason, checkpoint_dir
        what = (
            f"saved step {step} in {checkpoint_dir}"
            if saved
            else f"stopped before the first step of this run (at step {step}), nothing new to save"
        )
        super().__init__(f"{reason}: {what}; run the same command to resume")


def config_path(workdir: str) -> str:
    return os.path.join(workdir, "config.json")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    text = json.dumps(config_lib.to_dict(config), indent=2, sort_keys=True)
    workdir_lib.write_atomically(config_path(workdir), lambda f: f.write(text.encode()))


def read_config(workdir: str) -> dict[str, Any] | None:
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the saved config {path}: {e}") from e


def differing_fields(a: dict[str, Any], b: dict[str, Any], names=None) -> list[tuple[str, Any, Any]]:
    """(field, value in a, value in b) for each dotted field (of `names`, default all) that differs."""
    a_flat, b_flat = config_lib.flatten(a), config_lib.flatten(b)
    names = sorted(set(a_flat) | set(b_flat)) if names is None else names
    return [
        (name, a_flat.get(name), b_flat.get(name)) for name in names if a_flat.get(name) != b_flat.get(name)
    ]


def differing_maths_fields(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
    """Fields that change the optimisation problem and differ between the saved and the current config.

    `train.num_steps` counts only when both use a decaying learning-rate schedule, whose length it sets
    (`config.maths_fields`). The saved config is completed by the defaults (`config.from_saved`), as
    evaluation reads it.
    """
    saved_config = config_lib.from_saved(saved, "the saved config", check=False)
    names = [
        name for name in config_lib.maths_fields(current) if name in config_lib.maths_fields(saved_config)
    ]
    return [
        f"{name} (saved {was!r}, now {now!r})"
        for name, was, now in differing_fields(
            config_lib.to_dict(saved_config), config_lib.to_dict(current), names
        )
    ]


class _DropOrbaxErrors(logging.Filter):
    """Drops orbax's ERROR records (each with a traceback); `Checkpointer` raises the failure as one
    CheckpointError instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_FILTER = _DropOrbaxErrors()


def _quiet_closed_loop_callbacks() -> None:
    """After a failed read, tensorstore's pending callbacks reach orbax's closed asyncio loop and each
    prints "RuntimeError: Event loop is closed" as an unraisable exception: noise after the CheckpointError
    that reports the failure. Only those are dropped; other unraisable exceptions print as before."""
    previous = sys.unraisablehook
    if getattr(previous, "_imaml_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook._imaml_quiet = True
    sys.unraisablehook = hook


def _one_line(error: BaseException, limit: int = 400) -> str:
    """The innermost cause of `error` as one short line (orbax's messages carry whole tensorstore specs)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.sub(
        r"\s*\[tensorstore_spec=.*?\]\s*$", "", text
    )  # A page of JSON naming no more than the path.
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    short = text if len(text) <= limit else text[:limit] + "..."
    # tensorstore reports a full disk as RESOURCE_EXHAUSTED, with the OS error at the end of a long message.
    if "No space left on device" not in short and ("RESOURCE_EXHAUSTED" in text or "No space left" in text):
        short = f"No space left on device ({short})"
    return short


def _retention(max_to_keep: int, best_metric: str, best_mode: str) -> dict[str, Any]:
    """Orbax options keeping the latest `max_to_keep` checkpoints, and the best by `best_metric` if set
    (orbax's preservation policies; a checkpoint saved without metrics never counts as the best)."""
    if not best_metric:
        return {"max_to_keep": max_to_keep}
    from orbax.checkpoint import checkpoint_managers as policies

    best = policies.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric],
        reverse=best_mode == "min",  # BestN keeps the end of the ascending order: the largest values.
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    return {"preservation_policy": policies.AnyPreservationPolicy([policies.LatestN(n=max_to_keep), best])}


def _abstract(template: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Checkpointer(workdir_lib.Closing):
    """`ocp.CheckpointManager` over `<workdir>/checkpoints`, saving host-side train states asynchronously.

    A context manager: leaving it (or `close()`) waits for pending saves.
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
        """With `config`, a run's checkpointer; without, a read-only one (evaluation and tools)."""
        self.workdir = workdir
        self.config = config
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if config is None:
            options = ocp.CheckpointManagerOptions(create=False)  # Never saves; read_only=True only warns.
        else:
            ck = config.checkpoint
            options = ocp.CheckpointManagerOptions(
                create=True,
                enable_async_checkpointing=ck.async_save,
                **_retention(ck.max_to_keep, ck.best_metric, ck.best_mode),
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # The step of the last save, until it is known to be complete.
        logging.getLogger("absl").addFilter(_ORBAX_FILTER)  # Orbax logs through absl.logging.
        _quiet_closed_loop_callbacks()

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        host_state: Any,
        extra_meta: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts saving `host_state` as `step` (in the background when `checkpoint.async_save`), with the
        held-out `metrics` of that step if it was evaluated (they rank it for `checkpoint.best_metric`).

        Returns False, saving nothing, when `step` is already saved (or being saved).
        """
        if step in self.manager.all_steps():
            return False
        # A copy: np.asarray of a CPU jax.Array may share the device buffer, which the next (donating) step
        # reuses while the background save still reads it.
        state_copy = jax.tree.map(np.array, host_state)
        meta = {
            "step": int(step),
            "config": config_lib.to_dict(self.config),
            "process_count": jax.process_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra_meta or {}),
        }
        best_metric = self.config.checkpoint.best_metric
        ranked = {best_metric: float(metrics[best_metric])} if best_metric and metrics else None
        if ranked is not None:
            meta["metrics"] = ranked
        with self._saving(step):
            started = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state_copy), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
                metrics=ranked,
            )
        self._in_flight = step
        return started

    @contextlib.contextmanager
    def _saving(self, step: int):
        """Turns a failed save (now, or the background one in flight) into one CheckpointError and removes
        its partial `<step>.orbax-checkpoint-tmp*` folder; complete checkpoints are never touched."""
        try:
            yield
        except Exception as e:
            failed = self._in_flight if self._in_flight is not None else step
            self._in_flight = None
            removed = self._remove_partial_saves()
            raise CheckpointError(
                f"saving checkpoint step {failed} in {self.directory} failed: {_one_line(e)}"
                f"{'; its partial files were removed' if removed else ''}. The checkpoints saved before "
                f"are intact ({self.all_steps() or 'none'}); free space or fix the directory, then run the "
                "same command to resume"
            ) from e

    def _remove_partial_saves(self) -> list[str]:
        if jax.process_index() != 0:
            return []
        partial = glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*"))
        for path in partial:
            shutil.rmtree(path, ignore_errors=True)
        try:
            self.manager.reload()
        except Exception:
            pass
        return partial

    def best_step(self, metric: str, mode: str) -> int:
        """The kept step with the best `metric` ("min" or "max") among those saved with it."""
        scored = {}
        for step in self.all_steps():
            value = (self.saved_meta(step).get("metrics") or {}).get(metric)
            if value is not None:
                scored[step] = value
        if not scored:
            raise CheckpointError(
                f"no checkpoint in {self.directory} was saved with the metric {metric!r} "
                f"(steps: {self.all_steps() or 'none'}); the run needs checkpoint.best_metric={metric!r}"
            )
        pick = min if mode == "min" else max
        return pick(scored, key=lambda step: (scored[step], -step))

    def _check_step(self, step: int) -> None:
        if step not in self.all_steps():
            raise CheckpointError(
                f"no complete checkpoint for step {step} in {self.directory} "
                f"(available: {self.all_steps() or 'none'})"
            )

    def _unreadable(self, step: int, what: str, error: Exception) -> CheckpointError:
        return CheckpointError(
            f"checkpoint step {step} at {self.step_path(step)} cannot be read ({what}: "
            f"{type(error).__name__}: {_one_line(error)}); choose another step with --restore_step "
            f"(available: {self.all_steps()})"
        )

    def saved_meta(self, step: int) -> dict[str, Any]:
        """The `meta` item of `step`: {'step', 'config', 'process_count', 'time', ...}."""
        self._check_step(step)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for damaged files.
            raise self._unreadable(step, "its meta item", e) from e

    def restore(self, step: int, template: Any) -> Any:
        """Restores `step` into the structure and dtypes of `template`, as host arrays."""
        self._check_step(step)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template)))
            )["state"]
        except Exception as e:  # orbax raises many types for damaged files.
            raise self._unreadable(step, "its state item", e) from e
        return jax.tree.map(np.asarray, restored)

    def restore_for_resume(
        self, template: Any, *, restore_step: int | None = None, allow_config_change: bool = False, log=print
    ) -> Any:
        """The state to train from: `template` if there is no checkpoint, else the latest (or `restore_step`).

        Refuses a checkpoint whose config differs in a maths field unless `allow_config_change`. When an
        earlier step than the latest is chosen, the later steps are moved aside so that they are neither
        resumed from by the next run nor overwritten.
        """
        steps = self.all_steps()
        if restore_step is None and not steps:
            return template
        step = steps[-1] if restore_step is None else restore_step
        self._check_step(step)
        saved_config = self.saved_meta(step).get("config") or read_config(self.workdir)
        differing = differing_maths_fields(saved_config, self.config) if saved_config else []
        if differing and not allow_config_change:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was written by a different experiment; fields "
                f"that change the maths differ: {'; '.join(differing)}. Use another --workdir, or pass "
                "--allow_config_change to continue anyway"
            )
        if differing:
            log(f"warning: continuing with changed maths fields: {'; '.join(differing)}")
        state = self.restore(step, template)
        later = [s for s in steps if s > step]
        if later:
            self._set_aside(later)
            log(
                f"resuming from step {step}: moved the later checkpoints {later} to "
                f"{os.path.join(self.workdir, SUPERSEDED_DIR)}"
            )
        return state

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, SUPERSEDED_DIR, time.strftime("%Y%m%d-%H%M%S"))
            os.makedirs(target, exist_ok=True)
            for step in steps:
                shutil.move(self.step_path(step), os.path.join(target, str(step)))
        _sync_processes("imaml_checkpoints_set_aside")
        self.manager.reload()

    def wait(self) -> None:
        """Waits for the save in flight; raises CheckpointError if it failed."""
        with self._saving(self._in_flight or 0):
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Waits for pending saves and releases the manager; safe to call twice."""
        if self.manager is not None:
            try:
                self.wait()
            finally:
                self.manager.close()
                self.manager = None


class PreemptionWatcher:
    """Context manager: `reached(step)` is True once SIGTERM/SIGINT arrived, at a step all processes agree on.

    One process: handlers for SIGTERM and SIGINT set a flag (a second SIGINT aborts at once, without saving).
    Several processes: JAX's preemption service catches SIGTERM and agrees on a step across processes
    (`reached_preemption_sync_point`, which every process must call at every step); SIGINT is forwarded to it
    as SIGTERM. Outside the main thread no handler can be installed and `reached` only sees the sync service.
    """

    def __init__(self):
        self._multiprocess = jax.process_count() > 1
        # A signal that arrived during start-up, before these handlers existed, counts as well.
        self.reason: str | None = None if self._multiprocess else workdir_lib.StartupSignals.received
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt  # Second Ctrl-C: give up on the save.
        self.reason = signal.Signals(signum).name
        if self._multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)  # Reaches JAX's preemption notifier (a C-level handler).
        else:
            print(
                f"{self.reason} received: stopping after the current step (or once start-up and compilation "
                "end), saving a checkpoint if a step has run (Ctrl-C again aborts without saving)",
                flush=True,
            )

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            # With several processes SIGTERM belongs to JAX's notifier: a Python handler would replace it.
            signums = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def reached(self, step: int) -> bool:
        if self._multiprocess:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.reason = self.reason or "SIGTERM"
                return True
            return False
        return self.reason is not None
