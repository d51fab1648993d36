"""Section 1: the project's meta-step against the notebook's formulation, at growing meta-batch sizes.

Both run on the same tasks (tasks 0..T-1 of step 0), from the same meta-parameters, with the same model,
lambda, maxiter and tol:
  project   parallel.make_backend: train_step with the implicit meta-gradient by CG, on one device with its
            tasks one after another (task_mapping 'map', lax.map: each task's L-BFGS stops at its own
            convergence) or vmapped ('vmap'), and sharded over every device of the machine (shard_map, in a
            subprocess: on CPU one simulated device per usable core, so the cores work in parallel, and
            `devices_per_core` times as many, which balances tasks of unequal cost better over the cores);
  notebook  bench/notebook_baseline.py: a Python loop over tasks in the jitted loss, jaxopt's default solve.
            Its compile time grows with the tasks, so it is compiled for at most `baseline_max_tasks`; a larger
            meta-batch runs that compiled program on consecutive chunks of tasks, one after another (the loop
            runs its tasks one after another anyway, so its cost is the sum; each chunk applies its own Adam
            update, a negligible extra).
The project also runs at `loose_inner_tol` (tasks mapped; one device, and the most devices): section 4 measures
that tolerance's meta-gradient error, which must be no worse than the notebook's for the comparison to count.
Compile time is `lower().compile()` (tracing included), once per row; `compile_times` then compiles the
project's one-device step at every size in alternation, `compile_repeats` rounds (compile time against the
meta-batch). Step time is the compiled call until its outputs are ready, each call on a fresh copy of the same
state (the project's step donates it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from bench import notebook_baseline, scaling
from bench.settings import Problem, Settings, make_backend, make_config
from bench.timing import Timing, compile_timed, time_calls


def _summary(num_tasks: int, compile_s: float, timing, iterations_mean, iterations_max) -> dict[str, Any]:
    return dict(
        compile_s=compile_s,
        step_s=timing.to_json(),
        tasks_per_s=num_tasks / timing.median,
        inner_iterations_mean=float(iterations_mean),
        inner_iterations_max=float(iterations_max),
    )


def _project_backend(settings: Settings, num_tasks: int, mapping: str, inner_tol: float | None = None):
    """(backend, host state, task batch) of the project's step on one device."""
    config = make_config(
        settings,
        train__meta_batch_size=num_tasks,
        parallel__task_mapping=mapping,
        inner__tol=inner_tol or settings.inner_tol,
    )
    problem = Problem.create(config)
    backend = make_backend(config, problem)
    return backend, problem.host_state(), jax.device_put(problem.tasks(num_tasks), backend.devices[0])


def project_step(
    settings: Settings, num_tasks: int, mapping: str, log=print, inner_tol: float | None = None
) -> dict[str, Any]:
    """The project's step on one device, its tasks one after another (mapping 'map') or vmapped ('vmap'), at
    the benchmark's inner tolerance or at `inner_tol`."""
    backend, host_state, task_batch = _project_backend(settings, num_tasks, mapping, inner_tol)
    compiled, compile_s = compile_timed(backend.step, backend.put_state(host_state), task_batch)
    timing, (_, metrics) = time_calls(
        compiled,
        lambda: (backend.put_state(host_state), task_batch),
        reps=settings.reps,
        budget_s=settings.budget_s,
    )
    name = mapping if inner_tol is None else f"{mapping}, inner tol {inner_tol:g}"
    log(f"  project ({name}) T={num_tasks}: step {timing.median:.3f} s, compile {compile_s:.1f} s")
    return _summary(
        num_tasks, compile_s, timing, metrics["inner_iterations_mean"], metrics["inner_iterations_max"]
    )


def compile_times(settings: Settings, mapping: str = "map", log=print) -> dict[str, Any]:
    """The project's one-device step compiled at every meta-batch size in turn, `compile_repeats` rounds.

    Sizes alternate within each round, so a slow spell of a shared machine falls on all of them rather than on
    one size's repetitions; JAX's in-memory caches are cleared before each compilation."""
    setups = {n: _project_backend(settings, n, mapping) for n in settings.task_counts}
    samples: dict[int, list[float]] = {n: [] for n in settings.task_counts}
    for _ in range(settings.compile_repeats):
        for num_tasks, (backend, host_state, task_batch) in setups.items():
            jax.clear_caches()
            samples[num_tasks].append(
                compile_timed(backend.step, backend.put_state(host_state), task_batch)[1]
            )
    timings = {n: Timing.of(s) for n, s in samples.items()}
    medians = [t.median for t in timings.values()]
    spread = max(medians) / min(medians)
    log(f"  compile ({mapping}): " + ", ".join(f"T={n} {t.median:.1f} s" for n, t in timings.items()))
    return dict(
        mapping=mapping,
        rounds=settings.compile_repeats,
        by_tasks={str(n): t.to_json() for n, t in timings.items()},
        max_over_min=spread,
    )


def sharded_step(
    settings: Settings,
    num_tasks: int,
    platform: str,
    devices: int,
    compile_cache: bool,
    log=print,
    inner_tol: float | None = None,
) -> dict[str, Any] | None:
    """The project's step sharded over `devices` devices (tasks one after another on each), in a subprocess,
    at the benchmark's inner tolerance or at `inner_tol`."""
    if devices < 2 or num_tasks % devices:
        return None
    worker_settings = dataclasses.replace(
        settings, scaling_batch=num_tasks, task_mapping="map", inner_tol=inner_tol or settings.inner_tol
    )
    row = scaling.run_worker(worker_settings, platform, devices, compile_cache)
    name = f"map, {devices} {platform} devices" + ("" if inner_tol is None else f", inner tol {inner_tol:g}")
    if "error" in row:
        log(f"  project ({name}) T={num_tasks}: {row['error']}")
        return dict(error=row["error"], devices=devices)
    median = row["step_s"]["median"]
    log(f"  project ({name}) T={num_tasks}: step {median:.3f} s")
    timing = Timing(**row["step_s"])
    summary = _summary(
        num_tasks, row["compile_s"], timing, row["inner_iterations_mean"], row["inner_iterations_max"]
    )
    return {**summary, "devices": devices}


def notebook_step(
    settings: Settings, num_tasks: int, log=print, compiled_by_size: dict | None = None
) -> dict[str, Any] | None:
    """The notebook loop on `num_tasks` tasks: compiled for min(num_tasks, baseline_max_tasks), chunked above.

    `compiled_by_size` keeps compiled programs by task count, so a chunked row reuses the largest one (its
    compile time is then that program's).
    """
    compiled_by_size = {} if compiled_by_size is None else compiled_by_size
    chunk = min(num_tasks, settings.baseline_max_tasks)
    if num_tasks % chunk:
        return None
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
    chunks = [jax.tree.map(lambda a, i=i: a[i : i + chunk], task_batch) for i in range(0, num_tasks, chunk)]
    if chunk not in compiled_by_size:
        compiled_by_size[chunk] = compile_timed(step, theta, opt_state, chunks[0])
    compiled, compile_s = compiled_by_size[chunk]

    def run_chunks(theta, opt_state):
        return [compiled(theta, opt_state, c) for c in chunks]

    timing, outputs = time_calls(
        run_chunks, lambda: (theta, opt_state), reps=settings.reps, budget_s=settings.budget_s
    )
    chunked = f" ({len(chunks)} chunks of {chunk})" if len(chunks) > 1 else ""
    log(f"  notebook T={num_tasks}{chunked}: step {timing.median:.3f} s, compile {compile_s:.1f} s")
    iterations = np.concatenate([np.asarray(out["inner_iterations"]) for _, _, out in outputs])
    return {
        **_summary(num_tasks, compile_s, timing, iterations.mean(), iterations.max()),
        "compiled_tasks": chunk,
    }


def run(settings: Settings, platform: str, devices: int, compile_cache: bool, log=print) -> dict[str, Any]:
    """`devices`: the machine's devices for the sharded row (CPU: its usable cores); 1 skips that row."""
    rows, compiled_notebooks = [], {}
    for num_tasks in settings.task_counts:
        notebook = notebook_step(settings, num_tasks, log, compiled_notebooks)
        row: dict[str, Any] = dict(num_tasks=num_tasks, notebook=notebook)
        row["project"] = {m: project_step(settings, num_tasks, m, log) for m in settings.task_mappings}
        if settings.loose_inner_tol:
            tol = settings.loose_inner_tol
            row["project"][f"map, inner tol {tol:g}"] = project_step(settings, num_tasks, "map", log, tol)
        if settings.all_devices:
            counts = [devices]
            if platform == "cpu" and settings.devices_per_core > 1:
                counts.append(devices * settings.devices_per_core)
            for count in counts:
                sharded = sharded_step(settings, num_tasks, platform, count, compile_cache, log)
                if sharded is not None:
                    row["project"][f"map, {count} devices"] = sharded
            if settings.loose_inner_tol:  # The loose tolerance on the most devices too.
                tol = settings.loose_inner_tol
                sharded = sharded_step(settings, num_tasks, platform, counts[-1], compile_cache, log, tol)
                if sharded is not None:
                    row["project"][f"map, {counts[-1]} devices, inner tol {tol:g}"] = sharded
        if row["notebook"] is not None:
            notebook_median = row["notebook"]["step_s"]["median"]
            row["speedup"] = {
                m: notebook_median / p["step_s"]["median"] for m, p in row["project"].items() if "step_s" in p
            }
        rows.append(row)
    return dict(
        baseline_max_tasks=settings.baseline_max_tasks,
        rows=rows,
        compile_times=compile_times(settings, log=log),
    )
