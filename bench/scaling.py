"""Section 2: the project's sharded step on 1, 2, 4, 8 devices at a fixed meta-batch (strong scaling).

The device count of a JAX process is fixed when JAX starts, so each count runs in its own subprocess
(`python -m bench.scaling`): simulated CPU devices via XLA_FLAGS=--xla_force_host_platform_device_count=N,
and, on a machine with accelerators, the first N of its real devices. Efficiency = t_1 / (N t_N).
Simulated CPU devices share the machine's cores: with more devices than cores they cannot run in parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "


def _settings_json(settings) -> str:
    return json.dumps(dataclasses.asdict(settings))


def _worker_env(platform: str, num_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    if platform == "cpu":
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
        env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_worker(
    settings,
    platform: str,
    num_devices: int,
    compile_cache: bool,
    timeout_s: float = 900,
    cache_dir: str | None = None,
    executable: bool = True,
) -> dict[str, Any]:
    """One device count in a subprocess; a row with an `error` when it fails.

    With `cache_dir`, the worker uses the trainer's persistent compilation cache there (executables.configure_jax)
    and, if `executable`, gets its step as the train loop does (trainer.executables: the executable saved
    there, or compiled and saved).
    """
    command = [
        sys.executable,
        "-m",
        "bench.scaling",
        "--platform",
        platform,
        "--devices",
        str(num_devices),
        "--settings",
        _settings_json(settings),
    ] + ([] if compile_cache else ["--no-compile-cache"])
    if cache_dir is not None:
        command += ["--cache-dir", cache_dir] + ([] if executable else ["--no-executable"])
    row: dict[str, Any] = dict(platform=platform, devices=num_devices)
    env = _worker_env(platform, num_devices)
    if cache_dir is not None:  # The trainer's own cache folder, not one shared through the environment.
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    try:
        proc = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout_s:.0f} s"}
    results = [
        line[len(RESULT_PREFIX) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)
    ]
    if proc.returncode != 0 or not results:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**row, "error": f"exit status {proc.returncode}: {tail[0][:300]}"}
    return {**row, **json.loads(results[-1])}


def run(settings, platforms: dict[str, int], compile_cache: bool, log=print) -> dict[str, Any]:
    """`platforms` maps a platform to its available device count (cpu: simulated, any count)."""
    rows = []
    for platform, available in platforms.items():
        counts = [n for n in settings.scaling_devices if n <= available and settings.scaling_batch % n == 0]
        base = None
        for n in counts:
            row = run_worker(settings, platform, n, compile_cache)
            if "error" not in row:
                base = base or row["step_s"]["median"] * row["devices"]
                row["efficiency"] = base / (row["devices"] * row["step_s"]["median"])
                row["tasks_per_s"] = settings.scaling_batch / row["step_s"]["median"]
                median, efficiency = row["step_s"]["median"], row["efficiency"]
                log(f"  {platform} x{n}: step {median:.3f} s, efficiency {efficiency:.2f}")
            else:
                log(f"  {platform} x{n}: {row['error']}")
            rows.append(row)
    return dict(meta_batch=settings.scaling_batch, rows=rows)


def cache_run(settings, platform: str, log=print) -> dict[str, Any]:
    """A run's step got as the train loop gets it, in a fresh process with an empty cache folder (compiled,
    executable saved), then in two more fresh processes on that folder, as resumed runs: one with JAX's
    compilation cache alone (traced, lowered, compilation read from the cache), one as the trainer does it
    (the saved executable loaded)."""
    settings = dataclasses.replace(settings, task_mapping="map")
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as cache_dir:
        runs = {
            "first": run_worker(settings, platform, 1, True, cache_dir=cache_dir),
            "cache_only": run_worker(settings, platform, 1, True, cache_dir=cache_dir, executable=False),
            "resumed": run_worker(settings, platform, 1, True, cache_dir=cache_dir),
        }
    for name, row in runs.items():
        if "error" in row:
            log(f"  {name}: {row['error']}")
            return dict(error=f"{name}: {row['error']}")
        log(f"  {name}: {row['compile_s']:.2f} s ({row['source']})")
    first = runs["first"]["compile_s"]
    return dict(
        meta_batch=settings.scaling_batch,
        runs={name: {k: row[k] for k in ("compile_s", "lower_s", "source")} for name, row in runs.items()},
        ratio=runs["resumed"]["compile_s"] / first,
        cache_only_ratio=runs["cache_only"]["compile_s"] / first,
    )


def _worker_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One device count of the scaling benchmark (bench/run.py).")
    parser.add_argument("--platform", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--settings", required=True, help="bench.settings.Settings as JSON")
    parser.add_argument("--no-compile-cache", action="store_true")
    parser.add_argument("--cache-dir", help="use the trainer's persistent compilation cache in this folder")
    parser.add_argument(
        "--no-executable", action="store_true", help="with --cache-dir: compile, ignoring a saved executable"
    )
    args = parser.parse_args(argv)

    import jax

    from bench.settings import Problem, Settings, make_backend, make_config
    from bench.timing import time_calls
    from trainer import executables

    if args.no_compile_cache and not args.cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.settings).items()}
    settings = Settings(**fields)
    config = make_config(
        settings,
        train__meta_batch_size=settings.scaling_batch,
        parallel__backend="shard_map",
        parallel__num_devices=args.devices,
    )
    jax.config.update("jax_enable_x64", config.model.dtype == "float64")
    if args.cache_dir:  # The trainer's own set-up, as in a training run with compile_cache_dir=DIR.
        config.compile_cache_dir = args.cache_dir
        executables.configure_jax(config, workdir=args.cache_dir)
    problem = Problem.create(config)
    backend = make_backend(config, problem)
    host_state = problem.host_state()
    task_batch = backend.sample_tasks(problem.task_key, 0)
    if args.cache_dir and not args.no_executable:  # As train.py gets its step: loaded, or compiled and saved.
        compiled, source, compile_s = executables.train_step_for_run(
            backend,
            config,
            args.cache_dir,
            backend.put_state(host_state),
            task_batch,
            log=lambda message: None,
        )
        lower_s = None
    else:
        start = time.perf_counter()
        lowered = backend.step.lower(backend.put_state(host_state), task_batch)  # Tracing and lowering.
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()  # XLA compilation, or a persistent-cache hit.
        compile_s = time.perf_counter() - start
        source = "lower().compile()"
    timing, (_, metrics) = time_calls(
        compiled,
        lambda: (backend.put_state(host_state), task_batch),
        reps=settings.reps,
        budget_s=settings.budget_s,
    )
    print(
        RESULT_PREFIX
        + json.dumps(
            dict(
                compile_s=compile_s,
                lower_s=lower_s,
                source=source,
                step_s=timing.to_json(),
                device_kind=jax.devices()[0].device_kind,
                visible_devices=jax.device_count(),
                inner_iterations_max=float(metrics["inner_iterations_max"]),
                inner_iterations_mean=float(metrics["inner_iterations_mean"]),
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    _worker_main()
