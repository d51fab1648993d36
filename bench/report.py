"""The results as a markdown table (stdout and bench/results/<date>.md)."""

from __future__ import annotations

from typing import Any

from bench import omniglot
from bench.accuracy import LOOSE_KEY


def _t(timing: dict[str, Any] | None) -> str:
    """A timing as 'median [min-max]' in seconds."""
    if not timing:
        return "—"
    return f"{_num(timing['median'])} [{_num(timing['min'])}–{_num(timing['max'])}]"


def _num(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _mapping(settings: dict[str, Any]) -> str:
    mapping = settings["task_mapping"]
    if mapping == "auto":
        return "mapped by parallel.task_mapping=auto (one after another on CPU, vmapped on accelerators)"
    return "vmapped" if mapping == "vmap" else "one after another (lax.map)"


def _header(results: dict[str, Any]) -> list[str]:
    m, s = results["machine"], results["settings"]
    load = lambda v: "/".join(str(x) for x in v) if v else "n/a"
    widths = ", ".join(str(w) for w in (*s["hidden_sizes"], 1))
    title = (
        f"# iMAML trainer benchmark, {results['date']} ({results['mode']} mode, {results['total_s']:.0f} s)"
    )
    return [
        title,
        "",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), "
        f"{m['memory_gib']} GiB; {m['devices']} {m['platform']} device(s) ({m['device_kind']}) in the main "
        "process.",
        f"- Software: python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, jaxopt {m['jaxopt']}, "
        f"flax {m['flax']}, optax {m['optax']}; XLA_FLAGS={m['xla_flags'] or '(none)'}.",
        f"- Load average (1/5/15 min) at start {load(m['load_average_start'])}, at end "
        f"{load(m.get('load_average_end'))}: above the core count means other processes shared the CPUs.",
        f"- Problem: sinusoid tasks (configs/sinusoid_notebook.py), MLP [{widths}] ({results['num_params']} "
        f"parameters), {results['dtype']}, lambda {s['l2reg']}, inner L-BFGS maxiter {s['inner_maxiter']}, "
        f"tol {s['inner_tol']:g}, {s['linesearch']} line search.",
        f"- Times: median [min–max] of up to {s['reps']} calls after 1 warm-up call (at least 2, and no more "
        f"once {s['budget_s']:g} s were spent), in seconds. Compile times (lower + compile, tracing "
        f"included) are one measurement each, except the compile-time line of section 1; "
        f"{results['compile_cache']}.",
        "",
    ]


def _throughput(section: dict[str, Any], accuracy: dict[str, Any] | None) -> list[str]:
    lines = [
        "## 1. Throughput: the project's step vs the notebook's formulation",
        "",
        "notebook loop = Python loop over tasks inside the jitted loss, one jaxopt L-BFGS after another, "
        "jaxopt's default implicit solve (normal CG, tol 1e-5); bench/notebook_baseline.py; compiled for at "
        f"most {section['baseline_max_tasks']} tasks (its compile time grows ~7 s per task), larger "
        "meta-batches run that program on consecutive chunks (its cost is a sum over tasks). project = "
        "trainer.parallel (train_step, implicit meta-gradient by CG to tol 1e-10) on one device with its tasks "
        "one after another (map: lax.map, parallel.task_mapping='map', the CPU default) or vmapped (vmap), and "
        "sharded with shard_map over every device of the machine (CPU: one simulated device per usable core, and "
        "bench.settings.devices_per_core per core: more, smaller pieces of work, which the OS balances better over the cores when the tasks' "
        "inner solves differ in cost). "
        "Same tasks, model and inner settings. vs notebook = notebook step time / this step time. meta-grad "
        "error = relative error of the meta-batch mean against the exact meta-gradient (section 4).",
        "",
        "| tasks | formulation | step (s) | tasks/s | compile (s) | vs notebook | meta-grad error "
        "| inner it. mean / max |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    errors = {}
    if accuracy:
        by_key = {r["key"]: r for r in accuracy["rows"]}
        errors = {
            name: f"{by_key[key]['rel_error_of_mean']:.1e}"
            for name, key in (
                ("notebook", "notebook"),
                ("project", "implicit_default"),
                ("loose", LOOSE_KEY),
            )
            if key in by_key
        }
    for row in section["rows"]:
        tasks, nb = row["num_tasks"], row["notebook"]
        if nb is None:
            lines.append(f"| {tasks} | notebook loop | not run | — | — | — | — | — |")
        else:
            name = "notebook loop"
            if nb.get("compiled_tasks", tasks) < tasks:
                name += f" ({tasks // nb['compiled_tasks']} chunks of {nb['compiled_tasks']})"
            lines.append(_throughput_row(tasks, name, nb, "1.00x", errors.get("notebook", "—")))
        for mapping, project in row["project"].items():
            if "error" in project:
                lines.append(
                    f"| {tasks} | project, {mapping} | failed: {project['error']} | — | — | — | — | — |"
                )
                continue
            speedup = f"{row['speedup'][mapping]:.2f}x" if nb is not None else "—"
            lines.append(
                _throughput_row(
                    tasks,
                    f"project, {mapping}",
                    project,
                    speedup,
                    errors.get("loose" if "inner tol" in mapping else "project", "—"),
                )
            )
    lines.append("")
    compiles = section.get("compile_times")
    if compiles:
        by_tasks = ", ".join(f"{n} tasks {_t(t)}" for n, t in compiles["by_tasks"].items())
        lines += [
            f"Compile time of the project's step ({compiles['mapping']}, one device) against the meta-batch, "
            f"{compiles['rounds']} rounds, each compiling every size in turn (median [min–max], s): {by_tasks}; "
            f"max/min of the medians {compiles['max_over_min']:.2f}.",
            "",
        ]
    return lines


def _throughput_row(tasks: int, name: str, m: dict[str, Any], speedup: str, error: str) -> str:
    return (
        f"| {tasks} | {name} | {_t(m['step_s'])} | {m['tasks_per_s']:.3g} | {m['compile_s']:.1f} "
        f"| {speedup} | {error} | {m['inner_iterations_mean']:.0f} / {m['inner_iterations_max']:.0f} |"
    )


def _cache(section: dict[str, Any]) -> list[str]:
    lines = ["## 5. A resumed run's compile: compilation cache and saved executable", ""]
    if "error" in section:
        return lines + [f"Failed: {section['error']}", ""]
    runs = section["runs"]
    described = {
        "first": "first run: traced, lowered, compiled; executable saved",
        "cache_only": "resumed, JAX's compilation cache only: traced, lowered, compilation read from the cache",
        "resumed": "resumed as the trainer does it: the saved executable loaded (trainer/executables.py)",
    }
    lines += [
        f"The step ({section['meta_batch']} tasks, one device) got in a fresh process with the trainer's "
        "set-up (executables.configure_jax and trainer.executables, compile_cache_dir in an empty folder), then in "
        "two more fresh processes with the same folder, as resumed runs. Time = until the compiled step is "
        "ready to run.",
        "",
        "| run | time (s) | of which tracing and lowering (s) | vs first |",
        "|---|---:|---:|---:|",
    ]
    for name, text in described.items():
        run = runs[name]
        lower = "—" if run["lower_s"] is None else f"{run['lower_s']:.2f}"
        ratio = run["compile_s"] / runs["first"]["compile_s"]
        lines.append(f"| {text} | {run['compile_s']:.2f} | {lower} | {ratio:.3f} |")
    return lines + [""]


def _scaling(section: dict[str, Any], machine: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    lines = [
        f"## 2. Scaling over devices: shard_map step at a fixed meta-batch of {section['meta_batch']} tasks",
        "",
        f"One subprocess per device count; each device's tasks {_mapping(settings)}. efficiency = "
        "t(1 device) / (devices x t(devices)).",
    ]
    if any(r["platform"] == "cpu" for r in section["rows"]):
        lines.append(
            f"CPU devices are simulated (--xla_force_host_platform_device_count) and share the machine's "
            f"{machine['cpu_cores_usable']} usable cores: beyond {machine['cpu_cores_usable']} devices "
            "they cannot run in parallel, so the efficiency there measures overhead, not hardware scaling."
        )
    lines += [
        "",
        "| platform | devices | step (s) | tasks/s | efficiency | compile (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in section["rows"]:
        if "error" in row:
            lines.append(f"| {row['platform']} | {row['devices']} | failed: {row['error']} | — | — | — |")
        else:
            lines.append(
                f"| {row['platform']} | {row['devices']} | {_t(row['step_s'])} | {row['tasks_per_s']:.3g} | "
                f"{row['efficiency']:.2f} | {row['compile_s']:.1f} |"
            )
    return lines + [""]


def _memory(section: dict[str, Any]) -> list[str]:
    by = {(r["estimator"], r["maxiter"]): r for r in section["rows"]}
    maxiters = sorted({r["maxiter"] for r in section["rows"]})
    lines = [
        "## 3. Memory of one task's meta-gradient vs inner iterations",
        "",
        f"Method: {section['method']}. implicit = L-BFGS + CG; unrolled = reverse mode through gradient "
        "descent.",
        "",
        "| inner maxiter | implicit temp | implicit total | unrolled temp | unrolled total |",
        "|---:|---:|---:|---:|---:|",
    ]
    for maxiter in maxiters:
        cells = []
        for estimator in ("implicit", "unrolled"):
            row = by.get((estimator, maxiter), {})
            cells += [_bytes(row.get("temp_bytes")), _bytes(row.get("total_bytes"))]
        lines.append(f"| {maxiter} | " + " | ".join(cells) + " |")
    return lines + [""]


def _accuracy(section: dict[str, Any]) -> list[str]:
    lines = [
        f"## 4. Meta-gradient estimators: accuracy and cost ({section['num_tasks']} tasks)",
        "",
        "Exact reference: lambda (H + lambda I)^-1 grad L_query(x*), dense Hessian and dense solve, x* "
        f"solved to tol {section['reference_tol']:g} (max residual {section['reference_residual_max']:.1e}). "
        "Errors are relative (||g - g_exact|| / ||g_exact||): of the meta-batch mean, and per task. Time: "
        "the meta-gradients of all the tasks, one after another (lax.map: each stops at its own "
        "convergence), without the optimizer update.",
        "",
        "Inner solves converged: residual ||grad L + lambda (x - theta)|| <= tol at the returned point "
        "(the project's check; the notebook's solver reports only its iterations).",
        "",
        "| estimator | rel. error of mean | per-task rel. error median [max] | time (s) | compile (s) "
        "| inner it. mean | inner converged (max residual) |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for row in section["rows"]:
        converged = "—"
        if "inner_converged" in row:
            converged = f"{row['inner_converged']}/{section['num_tasks']} ({row['inner_residual_max']:.1e})"
        lines.append(
            f"| {row['estimator']} | {row['rel_error_of_mean']:.1e} | {row['rel_error_median']:.1e} "
            f"[{row['rel_error_max']:.1e}] | {_t(row['time_s'])} | {row['compile_s']:.1f} "
            f"| {row['inner_iterations_mean']:.0f} | {converged} |"
        )
    return lines + [""]


def _omniglot(section: dict[str, Any]) -> list[str]:
    lines = [
        "## 6. The Omniglot meta-step",
        "",
        "5-way 1-shot, float32, random images (bench/omniglot.py); per inner solver, convolution and task "
        "mapping. GFLOP/s counts the maths' FLOPs (XLA's cost analysis of nn.Conv's evaluation, Hessian-vector "
        "product and query gradient, times evaluations per task); peak: a float32 matmul on every device.",
        "",
    ]
    for result in section["settings"]:
        if "error" in result:
            lines += [
                f"conv width {result['width']}, meta-batch {result['meta_batch']}: {result['error']}",
                "",
            ]
        else:
            lines += omniglot.table(result) + [""]
    return lines


def markdown(results: dict[str, Any]) -> str:
    sections = results["sections"]
    lines = _header(results)
    if "throughput" in sections:
        lines += _throughput(sections["throughput"], sections.get("accuracy"))
    if "scaling" in sections:
        lines += _scaling(sections["scaling"], results["machine"], results["settings"])
    if "memory" in sections:
        lines += _memory(sections["memory"])
    if "accuracy" in sections:
        lines += _accuracy(sections["accuracy"])
    if "cache" in sections:
        lines += _cache(sections["cache"])
    if "omniglot" in sections:
        lines += _omniglot(sections["omniglot"])
    return "\n".join(lines)
