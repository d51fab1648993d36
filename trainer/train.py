"""The training loop: `train_and_evaluate(config, workdir)`, called by the CLI and by tests.

The loop dispatches step N before it pulls step N-1's metrics to the host, checks them for NaN/inf,
logs every `logging.every_steps`, evaluates on held-out tasks every `eval.every_steps` and at the end,
and checkpoints every `checkpoint.every_steps` and at the end. A workdir with checkpoints resumes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from trainer import checkpointing
from trainer import config as config_lib
from trainer import evaluation
from trainer import meta_grad as meta_grad_lib
from trainer import model as model_lib
from trainer import monitoring
from trainer import optim
from trainer import parallel
from trainer import tasks as tasks_lib
from trainer import train_step as train_step_lib


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or inf; the message names the step and the quantity."""


@dataclasses.dataclass
class TrainResult:
    state: Any  # Final host-side TrainState.
    eval_summary: dict[str, float]  # Last held-out evaluation.
    history: list[dict[str, Any]]  # Host metrics of every step run in this call (not only logged ones).
    backend: Any


def configure_jax(config: ml_collections.ConfigDict) -> None:
    """Global JAX settings the config needs; must run before any array is created."""
    if config.model.dtype == "float64":
        jax.config.update("jax_enable_x64", True)


def check_finite(step: int, metrics: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> None:
    for name in ("query_loss", "support_loss", "grad_norm", "param_norm", "update_norm"):
        value = float(metrics[name])
        if not np.isfinite(value):
            hint = ""
            if config.meta_grad.estimator == "unrolled":
                hint = (" (estimator 'unrolled': reverse mode through the inner iterations overflowed; lower "
                        "inner.unrolled_stepsize or use meta_grad.estimator=implicit)")
            raise NonFiniteError(
                f"step {step}: {name} is {value}; {int(metrics['inner_nonconverged_tasks'])} of "
                f"{config.train.meta_batch_size} inner solves did not converge (max inner residual "
                f"{float(metrics['inner_residual_max']):.3g}){hint}")


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False, restore_step: int | None = None) -> TrainResult:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final state."""
    config_lib.validate(config)
    configure_jax(config)
    is_main = jax.process_index() == 0
    dtype = model_lib.dtype_of(config)
    model = model_lib.make_model(config)
    keys = tasks_lib.split_keys(config.seed)
    optimizer, schedule = optim.make_optimizer(config)
    task_meta_grad = meta_grad_lib.make_task_meta_grad(config, model)
    backend = parallel.make_backend(config, task_meta_grad, optimizer, dtype)

    host_state = jax.tree.map(np.asarray, train_step_lib.create_train_state(
        model_lib.init_params(model, keys["init"]), optimizer, keys["train"]))
    checkpointer = checkpointing.Checkpointer(workdir, config)
    start_step = restore_step if restore_step is not None else checkpointer.latest_step()
    if start_step is not None:
        saved = checkpointing.read_config(workdir)
        differing = checkpointing.differing_maths_fields(saved, config) if saved else []
        if differing and not allow_config_change:
            raise checkpointing.CheckpointError(
                f"{workdir} holds checkpoints of a different experiment; fields that differ: {differing}. "
                "Use another --workdir, or pass --allow_config_change to continue anyway")
        host_state = checkpointer.restore(start_step, host_state)
    start_step = int(host_state.step)
    if is_main:
        checkpointing.write_config(workdir, config)

    writer = monitoring.MetricsWriter(workdir, enabled=is_main, resume_step=start_step,
                                      num_steps=config.train.num_steps)
    writer.log(f"training {config.train.num_steps} steps from step {start_step} on {backend.num_devices} "
               f"device(s) ({backend.name}, {jax.devices()[0].platform}); workdir {workdir}")
    evaluator = evaluation.Evaluator(config, model, keys["eval"])
    state = backend.put_state(host_state)
    task_key = jax.numpy.asarray(host_state.task_key)
    last = config.train.num_steps
    history: list[dict[str, Any]] = []
    eval_summary: dict[str, float] = {}
    pending = None  # (step number after the update, device metrics, dispatch time)
    compile_time = None

    def finish(done_step: int, device_metrics, started: float, extra: dict | None = None) -> None:
        """Pulls a finished step's metrics to the host, checks them, and logs them when due."""
        nonlocal compile_time
        metrics = backend.metrics_to_host(device_metrics)
        elapsed = time.perf_counter() - started
        check_finite(done_step, metrics, config)
        metrics["learning_rate"] = np.asarray(schedule(done_step - 1))
        metrics["step_time_s"] = np.asarray(elapsed)
        metrics["tasks_per_s"] = np.asarray(config.train.meta_batch_size / max(elapsed, 1e-9))
        if compile_time is None:
            compile_time = elapsed
            metrics["first_step_time_s"] = np.asarray(compile_time)
        history.append({"step": done_step, **metrics})
        writer.progress(done_step, float(metrics["query_loss"]))
        if extra or _due(done_step, config.logging.every_steps, last) or done_step == start_step + 1:
            writer.write(done_step, {**metrics, **(extra or {})})
            writer.log(f"step {done_step}: query_loss {float(metrics['query_loss']):.5g} support_loss "
                       f"{float(metrics['support_loss']):.3g} grad_norm {float(metrics['grad_norm']):.3g} "
                       f"inner_iters mean {float(metrics['inner_iterations_mean']):.0f} max "
                       f"{float(metrics['inner_iterations_max']):.0f} converged "
                       f"{float(metrics['inner_converged_fraction']):.2f} ({elapsed:.3f} s)")

    step_started = time.perf_counter()
    for step in range(start_step, last):
        done_step = step + 1
        task_batch = backend.sample_tasks(task_key, step)
        state, device_metrics = backend.step(state, task_batch)  # Dispatched; runs while we log step N-1.
        if pending is not None:
            finish(*pending)
        now = time.perf_counter()
        pending = (done_step, device_metrics, step_started)
        step_started = now
        eval_due = _due(done_step, config.eval.every_steps, last)
        ckpt_due = _due(done_step, config.checkpoint.every_steps, last)
        if eval_due or ckpt_due:
            host_state = backend.host_state(state)  # Waits for this step.
            check_finite(done_step, backend.metrics_to_host(device_metrics), config)
            if ckpt_due:
                checkpointer.save(done_step, host_state)
            extra = None
            if eval_due:
                eval_summary, _ = evaluator(host_state.meta_params)
                extra = eval_summary
            finish(*pending, extra=extra)
            if eval_due:
                writer.log(evaluation.format_summary(done_step, eval_summary))
            pending = None
            step_started = time.perf_counter()
    if pending is not None:
        finish(*pending)
    host_state = backend.host_state(state)
    checkpointer.close()
    writer.close()
    return TrainResult(state=host_state, eval_summary=eval_summary, history=history, backend=backend)
