"""The training loop: `train_and_evaluate(config, workdir)`, called by the CLI and by tests.

The loop dispatches step N before it pulls step N-1's metrics to the host, checks them for NaN/inf,
logs every `logging.every_steps`, evaluates on held-out tasks every `eval.every_steps` and at the end,
and checkpoints every `checkpoint.every_steps` and at the end. A workdir with checkpoints resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from trainer import (
    checkpointing,
    evaluation,
    executables,
    families,
    figures,
    monitoring,
    optim,
    parallel,
    runs,
)
from trainer import config as config_lib
from trainer import mapping as mapping_lib
from trainer import model as model_lib
from trainer import train_step as train_step_lib
from trainer import workdir as workdir_lib


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or inf; the message names the step and the quantity."""


@dataclasses.dataclass
class TrainResult:
    state: Any  # Final host-side TrainState.
    eval_summary: dict[str, float]  # Last held-out evaluation.
    history: list[dict[str, Any]]  # Host metrics of every step run in this call (not only logged ones).
    backend: Any


def check_finite(step: int, metrics: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> None:
    for name in ("query_loss", "support_loss", "grad_norm", "param_norm", "update_norm"):
        value = float(metrics[name])
        if not np.isfinite(value):
            hint = ""
            if config.meta_grad.estimator == "unrolled":
                hint = (
                    " (estimator 'unrolled': reverse mode through the inner iterations overflowed; lower "
                    "inner.unrolled_stepsize or use meta_grad.estimator=implicit)"
                )
            diverged = (
                f"{int(metrics['inner_diverged_tasks'])} of {config.train.meta_batch_size} tasks diverged "
                "(NaN/inf inner solution or query loss); "
                if "inner_diverged_tasks" in metrics
                else ""
            )
            raise NonFiniteError(
                f"step {step}: {name} is {value}; {diverged}{int(metrics['inner_nonconverged_tasks'])} of "
                f"{config.train.meta_batch_size} inner solves did not converge (max inner residual "
                f"{float(metrics['inner_residual_max']):.3g}){hint}"
            )


class UnusableStepsError(NonFiniteError):
    """Too many tasks were left out of the meta-gradient (meta_grad.drop_tasks); the message says which."""


class StepClock:
    """Device time of consecutive steps from host timestamps.

    A step starts when it is dispatched or when the previous step finished, whichever is later (the device
    runs one step at a time), and ends when the host, waiting for it, sees its result. Steps dispatched
    ahead of time are therefore not counted twice, and pauses between steps (evaluation, checkpoints)
    are not counted at all.
    """

    def __init__(self):
        self.last_ready = -float("inf")  # perf_counter time at which the last finished step was seen.

    def finished(self, dispatched: float) -> float:
        """Seconds of the step dispatched at `dispatched` (perf_counter), whose result is now on the host."""
        ready = time.perf_counter()
        elapsed = ready - max(dispatched, self.last_ready)
        self.last_ready = ready
        return elapsed


class DropGuard:
    """Stops a run whose steps lose their tasks (meta_grad.max_dropped_fraction, max_dropped_steps).

    A step that drops every task stops the run at once; otherwise the run stops after max_dropped_steps
    consecutive steps that each drop more than max_dropped_fraction of the meta-batch.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.batch_size = config.train.meta_batch_size
        self.max_fraction = config.meta_grad.max_dropped_fraction
        self.max_steps = config.meta_grad.max_dropped_steps
        self.residual_limit = train_step_lib.TaskFilter.from_config(config).max_residual
        self.policy = config.meta_grad.drop_tasks
        self.streak = 0

    def check(self, step: int, metrics: dict[str, np.ndarray]) -> str | None:
        """Raises UnusableStepsError when the run must stop; returns a line to print when tasks were dropped."""
        dropped = int(metrics["inner_dropped_tasks"])
        self.streak = self.streak + 1 if dropped > self.max_fraction * self.batch_size else 0
        if not dropped:
            return None
        why = (
            f"{int(metrics['inner_diverged_tasks'])} non-finite, max inner residual "
            f"{float(metrics['inner_residual_max']):.3g} (limit {self.residual_limit:.3g} with "
            f"meta_grad.drop_tasks={self.policy!r})"
        )
        if dropped == self.batch_size:
            raise UnusableStepsError(
                f"step {step}: every one of the {dropped} tasks was dropped ({why}), so there is no meta-gradient; "
                "the inner solves fail: raise inner.maxiter or inner.l2reg, lower outer.learning_rate, or "
                "resume from an earlier checkpoint (--restore_step)"
            )
        if self.streak >= self.max_steps:
            raise UnusableStepsError(
                f"step {step}: more than {self.max_fraction:.0%} of the {self.batch_size} tasks were dropped in "
                f"each of the last {self.streak} steps (meta_grad.max_dropped_fraction, max_dropped_steps); "
                f"this step: {dropped} ({why}). Raise inner.maxiter or inner.l2reg, or lower "
                "outer.learning_rate"
            )
        return f"step {step}: dropped {dropped} of {self.batch_size} tasks from the meta-gradient ({why})"


def format_step(step: int, metrics: dict[str, np.ndarray]) -> str:
    """The terminal line of a logged step."""
    line = (
        f"step {step}: query_loss {float(metrics['query_loss']):.5g} support_loss "
        f"{float(metrics['support_loss']):.3g} grad_norm {float(metrics['grad_norm']):.3g} "
        f"inner_iters mean {float(metrics['inner_iterations_mean']):.0f} max "
        f"{float(metrics['inner_iterations_max']):.0f} converged {float(metrics['inner_converged_fraction']):.2f} "
        f"dropped {int(metrics['inner_dropped_tasks'])}"
    )
    if "query_accuracy" in metrics:
        line += f" query_accuracy {float(metrics['query_accuracy']):.3f}"
    return line + f" ({float(metrics['step_time_s']):.3f} s)"


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
    restore_step: int | None = None,
    profile_steps: tuple[int, int] | None = None,
) -> TrainResult:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns the final state.

    A fresh run starts from `config.train.init_from`'s meta-parameters when set. `profile_steps=(a, b)`
    writes a `jax.profiler` trace of the steps logged as a+1..b to `<workdir>/tensorboard/plugins/profile`.
    Raises `checkpointing.Preempted` after saving the current step on SIGTERM/SIGINT. Pending checkpoint
    saves are waited for on every exit, error or not.
    """
    with contextlib.ExitStack() as cleanup:
        return _train_and_evaluate(
            config,
            workdir,
            cleanup,
            allow_config_change=allow_config_change,
            restore_step=restore_step,
            profile_steps=profile_steps,
        )


def parse_init_from(value: str) -> tuple[str, int | None]:
    """ "DIR" or "DIR:STEP" -> (DIR, STEP or None)."""
    path, _, step = value.rpartition(":")
    if path and step.isdigit():
        return path, int(step)
    return value, None


def warm_start(config: ml_collections.ConfigDict, host_state: Any, log) -> tuple[Any, str]:
    """`host_state` with the meta-parameters of `config.train.init_from`'s checkpoint; and "<abs dir>:<step>".

    The source run's own saved config builds its parameter tree; every parameter must have the shape this
    run's model gives it (a ConfigError names the first that does not).
    """
    directory, step = parse_init_from(config.train.init_from)
    try:
        _, _, _, params, step = runs.load_run(directory, step, None, warn=log)
    except runs.RunError as e:
        raise config_lib.ConfigError(f"train.init_from={config.train.init_from!r}: {e}") from e
    ours, _ = jax.tree_util.tree_flatten_with_path(host_state.meta_params)
    theirs = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    source = f"{os.path.abspath(directory)}:{step}"
    names = {jax.tree_util.keystr(path) for path, _ in ours}
    extra = sorted(jax.tree_util.keystr(path) for path in theirs if jax.tree_util.keystr(path) not in names)
    if extra:
        raise config_lib.ConfigError(
            f"train.init_from={source}: the source has parameters this model lacks: {extra}"
        )
    leaves = []
    for path, leaf in ours:
        name = jax.tree_util.keystr(path)
        if path not in theirs:
            raise config_lib.ConfigError(
                f"train.init_from={source}: parameter {name} is missing in the source"
            )
        if np.shape(theirs[path]) != np.shape(leaf):
            raise config_lib.ConfigError(
                f"train.init_from={source}: parameter {name} has shape {tuple(np.shape(theirs[path]))} "
                f"there and {tuple(np.shape(leaf))} in this model"
            )
        leaves.append(np.asarray(theirs[path], dtype=np.asarray(leaf).dtype))
    treedef = jax.tree.structure(host_state.meta_params)
    return host_state.replace(meta_params=jax.tree.unflatten(treedef, leaves)), source


class StepProfiler:
    """A `jax.profiler` trace of the steps logged as start+1..end, where TensorBoard's profile plugin reads it
    (`<log_dir>/plugins/profile/<time>/`); each step is marked with `StepTraceAnnotation`. Off (None): no
    trace, and `annotate` is a null context."""

    def __init__(self, log_dir: str, steps: tuple[int, int] | None, log):
        self.log_dir, self.steps, self.log = log_dir, steps, log
        self.active = False

    def before_dispatch(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def annotate(self, step: int):
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def due_to_stop(self, step: int) -> bool:
        return self.active and step >= self.steps[1]

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self.log(
                f"profile of steps {self.steps[0] + 1}-{self.steps[1]} written to "
                f"{os.path.join(self.log_dir, 'plugins', 'profile')} (TensorBoard's Profile tab)"
            )


class Chrono:
    """The run's clocks, in one place: its start, the compilation time (`monitoring.CompileTimer`, stopped
    after the first dispatch) and each step's device time (`StepClock`)."""

    def __init__(self, compile_timer: monitoring.CompileTimer):
        self.started = time.perf_counter()
        self.compile = compile_timer
        self.steps = StepClock()

    def step_times(self, dispatched: float, first: bool) -> dict[str, np.ndarray]:
        """step_time_s of the step dispatched at `dispatched`, whose result is now on the host; for the run's
        first step also what the user waited for it (first_step_time_s, compile included) and compile_time_s."""
        times = {"step_time_s": np.asarray(self.steps.finished(dispatched))}
        if first:
            times["first_step_time_s"] = np.asarray(self.steps.last_ready - self.started)
            times["compile_time_s"] = np.asarray(self.compile.seconds)
        return times


@dataclasses.dataclass
class _Pending:
    """A dispatched step whose metrics are still on the device."""

    step: int  # The step number after its update.
    metrics: dict[str, jax.Array]
    dispatched: float  # perf_counter time of its dispatch.


@dataclasses.dataclass
class _Run:
    """What the loop works with, built once by `_set_up`; `history` and `eval_summary` grow as it runs."""

    config: ml_collections.ConfigDict
    model: Any
    backend: Any
    evaluator: evaluation.Evaluator
    checkpointer: checkpointing.Checkpointer
    writer: monitoring.MetricsWriter
    preemption: checkpointing.PreemptionWatcher
    schedule: Any
    drops: DropGuard
    start_step: int
    host_state: Any
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_summary: dict[str, float] = dataclasses.field(default_factory=dict)


def _set_up(config, workdir, cleanup, *, allow_config_change, restore_step) -> _Run:
    """Locks the workdir, builds the family, model, step, backend and evaluator, and restores or warm-starts
    the state; every resource is closed by `cleanup`."""
    config_lib.validate(config)
    executables.configure_jax(config, workdir)
    is_main = jax.process_index() == 0
    log = print if is_main else lambda message: None
    # Before anything is read or written there: one run per workdir.
    cleanup.enter_context(workdir_lib.run_lock(workdir, log=log))
    # From here on SIGTERM/SIGINT stop the run at the next step boundary (start-up and compilation too).
    preemption = cleanup.enter_context(checkpointing.PreemptionWatcher())
    family = families.get_family(config)
    model = family.make_model(config)
    keys = families.split_keys(config.seed)
    optimizer, schedule = optim.make_optimizer(config)
    best_metric = config.checkpoint.best_metric
    if best_metric:  # Checked before anything is compiled.
        known = [f"eval/{m}_{n}" for m in evaluation.methods(family) for n in family.metric_names]
        if best_metric not in known:
            raise config_lib.ConfigError(
                f"config field 'checkpoint.best_metric' = {best_metric!r} is not a held-out metric of "
                f"tasks.family {config.tasks.family!r}: expected one of {known}"
            )
    task_data = family.load_data(config)  # Host arrays (Omniglot's images; None for sinusoid), loaded once.
    task_mapping = mapping_lib.task_mapping(config)  # "vmap" or "map", for the step and the evaluations.
    local_step = train_step_lib.make_train_step(config, model, family, optimizer, task_mapping)
    backend = parallel.make_backend(config, local_step, family, task_data.train)
    host_state = jax.tree.map(
        np.asarray,
        train_step_lib.create_train_state(
            model_lib.init_params(model, keys["init"]), optimizer, keys["train"]
        ),
    )
    checkpointer = cleanup.enter_context(checkpointing.Checkpointer(workdir, config))
    if config.train.init_from and not checkpointer.all_steps() and restore_step is None:
        host_state, source = warm_start(config, host_state, log)
        config.train.init_from = source  # Recorded as resolved in config.json, checkpoints and TensorBoard.
        log(f"warm start: meta-parameters of {source}, fresh optimizer state, step 0")
    elif config.train.init_from:
        log(
            f"resuming this run's own checkpoint; train.init_from={config.train.init_from!r} only starts a fresh run"
        )
    host_state = checkpointer.restore_for_resume(
        host_state, restore_step=restore_step, allow_config_change=allow_config_change, log=log
    )
    start_step = int(host_state.step)
    if is_main:
        checkpointing.write_config(workdir, config)
    # Closed on every exit (a NaN error too): the progress bar and the event files are finished cleanly.
    writer = cleanup.enter_context(
        monitoring.MetricsWriter(
            workdir, enabled=is_main, resume_step=start_step, num_steps=config.train.num_steps
        )
    )
    writer.log(
        f"training {config.train.num_steps} steps from step {start_step} on {backend.num_devices} "
        f"device(s) ({backend.name}, {jax.devices()[0].platform}); workdir {workdir}"
    )
    writer.write_config(config)
    evaluator = evaluation.Evaluator(config, model, keys["eval"], family, task_mapping, data=task_data.test)
    return _Run(
        config=config,
        model=model,
        backend=backend,
        evaluator=evaluator,
        checkpointer=checkpointer,
        writer=writer,
        preemption=preemption,
        schedule=schedule,
        drops=DropGuard(config),
        start_step=start_step,
        host_state=host_state,
    )


def _pull(run: _Run, pending: _Pending, chrono: Chrono) -> dict[str, np.ndarray]:
    """Waits for a dispatched step, times it, and checks its metrics (NaN/inf, dropped tasks): once per step."""
    config, step = run.config, pending.step
    metrics = run.backend.metrics_to_host(pending.metrics)
    times = chrono.step_times(pending.dispatched, first=step == run.start_step + 1)
    check_finite(step, metrics, config)
    dropped_message = run.drops.check(step, metrics)
    if dropped_message:
        run.writer.log(dropped_message)
    metrics["learning_rate"] = np.asarray(run.schedule(step - 1))
    metrics.update(times)
    metrics["tasks_per_s"] = np.asarray(config.train.meta_batch_size / max(float(times["step_time_s"]), 1e-9))
    return metrics


def _record(run: _Run, step: int, metrics: dict[str, np.ndarray], extra: dict | None = None) -> None:
    """Adds a pulled step to the history and writes it when due (always with evaluation results `extra`)."""
    run.history.append({"step": step, **metrics})
    run.writer.progress(step, float(metrics["query_loss"]))
    if (
        extra
        or _due(step, run.config.logging.every_steps, run.config.train.num_steps)
        or step == run.start_step + 1
    ):
        run.writer.write(step, {**metrics, **(extra or {})})
        run.writer.log(format_step(step, metrics))


def _finish(run: _Run, pending: _Pending | None, chrono: Chrono) -> None:
    """Pulls and records the step in flight, if any."""
    if pending is not None:
        _record(run, pending.step, _pull(run, pending, chrono))


def _evaluate_and_save(
    run: _Run, pending: _Pending, state, chrono: Chrono, *, evaluate: bool, save: bool
) -> None:
    """Finishes the step in flight (pulled first: timed and checked once), evaluates it and/or checkpoints it.
    The checkpoint is saved after the step's metrics are written, so that no resume can skip their line."""
    metrics = _pull(run, pending, chrono)
    host_state = run.backend.host_state(state)
    extra, outputs = _evaluate(run, host_state) if evaluate else (None, None)
    _record(run, pending.step, metrics, extra)
    if save:
        run.checkpointer.save(pending.step, host_state, metrics=extra)
    if evaluate:
        _report_evaluation(run, pending.step, host_state, outputs)


def _save_and_stop(run: _Run, step: int, state) -> None:
    """Saves `step` (unless no step ran in this call) and raises `checkpointing.Preempted`."""
    saved = step > run.start_step
    if saved:
        run.checkpointer.save(step, run.backend.host_state(state))
        run.checkpointer.wait()
    raise checkpointing.Preempted(step, run.preemption.reason, run.checkpointer.directory, saved=saved)


def _evaluate(run: _Run, host_state) -> tuple[dict[str, float], dict[str, Any]]:
    """The held-out evaluation of `host_state`: its metrics with eval_time_s, and its raw outputs."""
    started = time.perf_counter()
    summary, outputs = run.evaluator(host_state.meta_params)
    run.eval_summary = summary
    return {**summary, "eval_time_s": time.perf_counter() - started}, outputs


def _report_evaluation(run: _Run, step: int, host_state, outputs: dict[str, Any]) -> None:
    """The evaluation's line and its figures (training curves; predictions when the family kept outputs)."""
    run.writer.log(evaluation.format_summary(step, run.eval_summary))
    if run.writer.enabled:
        series = {name: run.writer.series(run.history, name) for name in ("grad_norm", "query_loss")}
        run.writer.write_figures(
            step, figures.evaluation_figures(run.model, run.config, host_state.meta_params, outputs, series)
        )


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    cleanup: contextlib.ExitStack,
    *,
    allow_config_change: bool,
    restore_step: int | None,
    profile_steps: tuple[int, int] | None,
) -> TrainResult:
    run = _set_up(
        config, workdir, cleanup, allow_config_change=allow_config_change, restore_step=restore_step
    )
    backend, checkpointer, writer, last = run.backend, run.checkpointer, run.writer, config.train.num_steps
    state = backend.put_state(run.host_state)
    task_key = jax.numpy.asarray(run.host_state.task_key)
    chrono = Chrono(cleanup.enter_context(monitoring.CompileTimer()))
    step_fn = backend.step
    if run.start_step < last:  # The step's executable saved by an earlier run, or compiled now and saved.
        step_fn, source, seconds = executables.train_step_for_run(
            backend, config, workdir, state, backend.sample_tasks(task_key, run.start_step), log=writer.log
        )
        if source == "loaded":  # No JAX compile event reports a loaded executable.
            chrono.compile.record(seconds)
    profiler = StepProfiler(monitoring.tensorboard_dir(workdir), profile_steps, writer.log)
    cleanup.callback(profiler.stop)
    best = bool(config.checkpoint.best_metric)  # Then every evaluated step is a candidate for the best.
    pending = None
    for step in range(run.start_step, last):
        if profiler.due_to_stop(step):  # The traced steps' results first, so that the trace holds them whole.
            _finish(run, pending, chrono)
            pending = None
            profiler.stop()
        if run.preemption.reached(step):  # SIGTERM/SIGINT (agreed on by all processes): save this step, stop.
            _finish(run, pending, chrono)
            _save_and_stop(run, step, state)
        task_batch = backend.sample_tasks(task_key, step)
        profiler.before_dispatch(step)
        dispatched = time.perf_counter()
        with profiler.annotate(step + 1):
            state, device_metrics = step_fn(state, task_batch)  # Runs while step N-1 is finished below.
        chrono.compile.stop()
        _finish(run, pending, chrono)
        pending = _Pending(step + 1, device_metrics, dispatched)
        eval_due = _due(pending.step, config.eval.every_steps, last)
        ckpt_due = _due(pending.step, config.checkpoint.every_steps, last) or (eval_due and best)
        if eval_due or ckpt_due:
            _evaluate_and_save(run, pending, state, chrono, evaluate=eval_due, save=ckpt_due)
            pending = None
    _finish(run, pending, chrono)
    profiler.stop()
    checkpointer.close()
    if run.eval_summary:
        writer.write_hparams(config, run.eval_summary)
    return TrainResult(
        state=backend.host_state(state), eval_summary=run.eval_summary, history=run.history, backend=backend
    )
