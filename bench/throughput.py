"""Section 1: the project's meta-step against the notebook's formulation, at growing meta-batch sizes.

Both run in this process on one device, on the same tasks (tasks 0..T-1 of step 0), from the same
meta-parameters, with the same model, lambda, maxiter and tol:
  project   parallel.make_backend(backend 'none'): train_step with the implicit meta-gradient by CG, its
            tasks vmapped (the default) and, as a second variant, one after another (lax.map, with
            parallel.vmap_tasks=False: each task's L-BFGS stops at its own convergence, not the slowest's);
  notebook  bench/notebook_baseline.py: a Python loop over tasks in the jitted loss, jaxopt's default solve.
Compile time is `lower().compile()` once (tracing included); step time is the compiled call until its
outputs are ready, each call on a fresh copy of the same state (the project's step donates it).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from bench import notebook_baseline
from bench.settings import Problem, Settings, make_config
from bench.timing import compile_timed, time_calls
from trainer import meta_grad as meta_grad_lib
from trainer import parallel


def _summary(num_tasks: int, compile_s: float, timing, iterations_mean, iterations_max) -> dict[str, Any]:
    return dict(
        compile_s=compile_s,
        step_s=timing.to_json(),
        tasks_per_s=num_tasks / timing.median,
        inner_iterations_mean=float(iterations_mean),
        inner_iterations_max=float(iterations_max),
    )


def project_step(settings: Settings, num_tasks: int, mapping: str, log=print) -> dict[str, Any]:
    """The project's step with its tasks vmapped (mapping 'vmap') or one after another ('lax.map')."""
    config = make_config(settings, train__meta_batch_size=num_tasks, parallel__vmap_tasks=mapping == "vmap")
    problem = Problem.create(config)
    backend = parallel.make_backend(
        config, meta_grad_lib.make_task_meta_grad(config, problem.model), problem.optimizer, problem.dtype
    )
    host_state = problem.host_state()
    task_batch = jax.device_put(problem.tasks(num_tasks), backend.devices[0])
    compiled, compile_s = compile_timed(backend.step, backend.put_state(host_state), task_batch)
    timing, (_, metrics) = time_calls(
        compiled,
        lambda: (backend.put_state(host_state), task_batch),
        reps=settings.reps,
        budget_s=settings.budget_s,
    )
    log(f"  project ({mapping}) T={num_tasks}: step {timing.median:.3f} s, compile {compile_s:.1f} s")
    return _summary(
        num_tasks, compile_s, timing, metrics["inner_iterations_mean"], metrics["inner_iterations_max"]
    )


def notebook_step(settings: Settings, num_tasks: int, log=print) -> dict[str, Any]:
    problem = Problem.create(make_config(settings))
    step = notebook_baseline.make_step(
        problem.model,
        settings.l2reg,
        settings.inner_maxiter,
        settings.inner_tol,
        problem.optimizer,
        settings.linesearch,
    )
    theta = problem.meta_params
    opt_state = problem.optimizer.init(theta)
    task_batch = problem.tasks(num_tasks)
    compiled, compile_s = compile_timed(step, theta, opt_state, task_batch)
    timing, (_, _, outputs) = time_calls(
        compiled, lambda: (theta, opt_state, task_batch), reps=settings.reps, budget_s=settings.budget_s
    )
    log(f"  notebook T={num_tasks}: step {timing.median:.3f} s, compile {compile_s:.1f} s")
    iterations = np.asarray(outputs["inner_iterations"])
    return _summary(num_tasks, compile_s, timing, iterations.mean(), iterations.max())


def run(settings: Settings, log=print) -> dict[str, Any]:
    rows = []
    for num_tasks in settings.task_counts:
        row: dict[str, Any] = dict(num_tasks=num_tasks)
        if num_tasks <= settings.baseline_max_tasks:
            row["notebook"] = notebook_step(settings, num_tasks, log)
        else:
            row["notebook"] = None
        row["project"] = {m: project_step(settings, num_tasks, m, log) for m in settings.task_mappings}
        if row["notebook"] is not None:
            notebook_median = row["notebook"]["step_s"]["median"]
            row["speedup"] = {m: notebook_median / p["step_s"]["median"] for m, p in row["project"].items()}
        rows.append(row)
    return dict(baseline_max_tasks=settings.baseline_max_tasks, rows=rows)
