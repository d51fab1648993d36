"""`make bench`: throughput against the notebook's formulation, device scaling, memory, estimator accuracy.

    python -m bench.run            # default sizes: ~35 minutes on a 2-core CPU (see README)
    python -m bench.run --quick    # tiny sizes: a smoke check of every section (numbers mean little)

Prints a markdown table to stdout (progress goes to stderr) and writes it with the raw numbers to
bench/results/<date>.md and .json. Sections: throughput, scaling, memory, accuracy (see their modules), cache
(scaling.cache_run) and omniglot (the Omniglot meta-step, bench/omniglot.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import jax  # noqa: E402

from bench import (  # noqa: E402
    accuracy,
    memory,
    omniglot,
    report,
    scaling,
    throughput,
    timing,  # noqa: E402
)
from bench import settings as settings_lib  # noqa: E402

SECTIONS = ("throughput", "scaling", "memory", "accuracy", "cache", "omniglot")
# --quick only: cheaper XLA CPU compilation; a smoke check's numbers do not matter.
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    (value,) = _ints(text)
    return value


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check, not a measurement")
    parser.add_argument(
        "--sections",
        type=_sections,
        default=SECTIONS,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where <date>.md and <date>.json go")
    parser.add_argument("--task-counts", type=_ints, help="section 1's meta-batch sizes, e.g. 4,16,64,256")
    parser.add_argument(
        "--baseline-max-tasks",
        type=_positive_int,
        help="largest meta-batch the notebook loop is compiled for (its compile time grows "
        "~7 s per task on a 2-core CPU)",
    )
    parser.add_argument("--devices", type=_ints, help="section 2's device counts, e.g. 1,2,4,8")
    parser.add_argument("--reps", type=_positive_int, help="timed repetitions per measurement")
    parser.add_argument(
        "--compile-cache",
        action="store_true",
        help="allow JAX's persistent compilation cache (compile times may then be cache hits; "
        "always allowed with --quick)",
    )
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace) -> settings_lib.Settings:
    base = settings_lib.QUICK if args.quick else settings_lib.DEFAULT
    overrides = dict(
        task_counts=args.task_counts,
        baseline_max_tasks=args.baseline_max_tasks,
        scaling_devices=args.devices,
        reps=args.reps,
    )
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = make_settings(args)
    if args.quick:  # Read when the backend starts (below), and inherited by the scaling subprocesses.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()
    log = lambda message: print(message, file=sys.stderr, flush=True)
    started = time.perf_counter()
    config = settings_lib.make_config(settings)
    if config.model.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    compile_cache = args.compile_cache or args.quick
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if compile_cache and cache_dir:
        cache_note = f"persistent compilation cache allowed ({cache_dir}): compile times may be cache hits"
    else:
        jax.config.update("jax_enable_compilation_cache", False)
        cache_note = "persistent compilation cache disabled, so compile times are real compilations"
    machine = timing.machine_info()
    problem = settings_lib.Problem.create(config)
    now = datetime.datetime.now()
    results = dict(
        mode="quick" if args.quick else "default",
        date=now.strftime("%Y-%m-%d %H:%M:%S"),
        machine=machine,
        settings=dataclasses.asdict(settings),
        dtype=config.model.dtype,
        num_params=settings_lib.num_params(problem.meta_params),
        compile_cache=cache_note,
        sections={},
    )
    log(
        f"bench: {results['mode']} mode, sections {','.join(args.sections)}; {machine['cpu']}, "
        f"{machine['devices']} {machine['platform']} device(s), load average {machine['load_average_start']}"
    )
    # Accuracy first: section 1's table quotes it. The output keeps the numbering of the issue.
    platform = machine["platform"]
    all_devices = machine["cpu_cores_usable"] if platform == "cpu" else machine["devices"]
    for name in ("accuracy", "throughput", "memory", "scaling", "cache", "omniglot"):
        if name not in args.sections:
            continue
        log(f"section {name}:")
        section_start = time.perf_counter()
        if name == "accuracy":
            results["sections"][name] = accuracy.run(settings, log)
        elif name == "throughput":
            results["sections"][name] = throughput.run(settings, platform, all_devices, compile_cache, log)
        elif name == "memory":
            results["sections"][name] = memory.run(settings, log)
        elif name == "cache":
            results["sections"][name] = scaling.cache_run(settings, platform, log)
        elif name == "omniglot":
            results["sections"][name] = omniglot.section(args.quick, all_devices, log)
        else:
            platforms = {"cpu": max(settings.scaling_devices)}
            if machine["platform"] != "cpu":
                platforms[machine["platform"]] = machine["devices"]
            results["sections"][name] = scaling.run(settings, platforms, compile_cache, log)
        results["sections"][name]["wall_s"] = time.perf_counter() - section_start
    machine["load_average_end"] = timing.load_average()
    results["total_s"] = time.perf_counter() - started

    table = report.markdown(results)
    print(table)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, now.strftime("%Y-%m-%d_%H%M%S") + ("-quick" if args.quick else ""))
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    log(f"bench: wrote {stem}.md and {stem}.json in {results['total_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
