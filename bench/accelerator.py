"""`make bench-gpu`: install the CUDA build of JAX, then time the meta-step on one GPU.

    python -m bench.accelerator --install --platform gpu   # pip install "jax[cudaNN]==<installed jax>", then measure
    python -m bench.accelerator --platform gpu             # measure with the JAX already installed
    python -m bench.accelerator --platform cpu --quick     # tiny sizes on CPU: a smoke check of the whole path

--install picks the extra from the CUDA version in `nvidia-smi`'s header (12.x: cuda12, 13 and later: cuda13);
JAX_CUDA=cuda12 (or --cuda cuda12) chooses it instead. pip runs in a subprocess, then this module starts again
in a fresh process without --install, so the new jaxlib plugin is the one loaded.

It measures, on the first device of the platform:
  sinusoid  the project's meta-step (bench/throughput.py's project_step with bench/settings.py's DEFAULT: the
            notebook's MLP, float64, L-BFGS, implicit meta-gradient by CG), tasks vmapped on an accelerator
            (lax.map on CPU), at meta-batches 32, 128, 512, 1024 and 4096: median step time after one
            compiling and one warm-up call;
  omniglot  bench/omniglot.py's meta-step (5-way 1-shot, random images) for gd/patches/vmap, gd/xla/vmap and
            lbfgs/xla/vmap at the paper setting (conv width 64, meta-batch 32) and at width 32, meta-batch 16:
            median of a few steps after the compiling call, inner evaluations per task, achieved GFLOP/s.
A row that would overrun --time-budget-s (predicted from the previous row of its part; the sinusoid part may
use at most half the budget) is skipped with a note. Prints a markdown table to stdout (progress to stderr)
and writes it with the raw numbers to <out-dir>/<date>_<time>_accelerator.md and .json (-quick appended with
--quick).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

PROG = "bench.accelerator"
DEFAULT_OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_TIME_BUDGET_S = 420.0
SINUSOID_SHARE = 0.5  # The sinusoid rows may use at most this fraction of the time budget.

SINUSOID_TASKS = (32, 128, 512, 1024, 4096)
SINUSOID_REPS = 5  # Timed steps after the compiling and the warm-up call (fewer past the per-row budget).
SINUSOID_ROW_BUDGET_S = 10.0  # Stop timing a row after this many timed seconds (at least 2 steps).
OMNIGLOT_VARIANTS = ("gd/patches/vmap", "gd/xla/vmap", "lbfgs/xla/vmap")
OMNIGLOT_STEPS = 3  # Timed steps after the compiling call.

QUICK_SINUSOID_TASKS = (4, 8)
QUICK_SINUSOID_REPS = 2
QUICK_OMNIGLOT_STEPS = 1

# Extras of jax that install a CUDA build, used when the installed jax's metadata cannot be read.
FALLBACK_CUDA_EXTRAS = ("cuda12", "cuda13", "cuda12-local", "cuda13-local")
JAX_CUDA_ENV = "JAX_CUDA"


class UserError(Exception):
    """A problem the user can fix: reported as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------- installing


def parse_cuda_version(nvidia_smi_output: str) -> tuple[int, int] | None:
    """The (major, minor) CUDA version the driver supports, from `nvidia-smi`'s header; None if absent."""
    match = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", nvidia_smi_output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def extra_for_cuda(version: tuple[int, int], jax_version: str) -> str:
    """The jax extra whose CUDA build runs on a driver supporting CUDA `version`."""
    major, minor = version
    if major >= 13:
        return "cuda13"
    if major == 12:
        return "cuda12"
    raise UserError(
        f"the NVIDIA driver supports CUDA {major}.{minor}, but jax {jax_version}'s CUDA builds need a driver "
        "for CUDA 12 or newer: update the NVIDIA driver"
    )


def read_nvidia_smi(which: Callable[[str], str | None] | None = None, run=None) -> str:
    """`nvidia-smi`'s output, or a UserError saying what is missing (`which`, `run`: shutil's and subprocess's
    by default)."""
    which, run = which or shutil.which, run or subprocess.run
    hint = f"install the NVIDIA driver, or set {JAX_CUDA_ENV}=cuda12 (or cuda13) to choose the CUDA build yourself"
    path = which("nvidia-smi")
    if path is None:
        raise UserError(f"nvidia-smi not found on PATH, so no NVIDIA driver is visible: {hint}")
    try:
        proc = run([path], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"could not run {path} ({err}): {hint}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = lines[0] if lines else f"exit status {proc.returncode}"
        raise UserError(f"nvidia-smi failed ({reason}): no usable NVIDIA GPU; {hint}")
    return proc.stdout


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cuda_extras() -> tuple[str, ...]:
    """The installed jax's extras that install a CUDA build (cuda12, cuda13, ...)."""
    try:
        extras = importlib.metadata.metadata("jax").get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:
        extras = []
    return tuple(e for e in extras if e.startswith("cuda")) or FALLBACK_CUDA_EXTRAS


def choose_extra(
    override: str | None,
    jax_version: str,
    allowed: Sequence[str],
    nvidia_smi: Callable[[], str] = read_nvidia_smi,
) -> str:
    """The user's choice (--cuda or JAX_CUDA) if given, else the one the driver's CUDA version calls for."""
    if override:
        if override not in allowed:
            raise UserError(
                f"{JAX_CUDA_ENV}/--cuda = {override!r}: expected one of {', '.join(allowed)} "
                f"(the CUDA extras of jax {jax_version})"
            )
        return override
    output = nvidia_smi()
    version = parse_cuda_version(output)
    if version is None:
        raise UserError(
            "nvidia-smi printed no 'CUDA Version: X.Y' (driver not loaded?): "
            f"set {JAX_CUDA_ENV}=cuda12 (or cuda13) to choose the CUDA build yourself"
        )
    return extra_for_cuda(version, jax_version)


def pip_command(extra: str, jax_version: str, python: str = sys.executable) -> list[str]:
    """pip installing the CUDA build `extra` of jax `jax_version` (its jaxlib and CUDA plugin) into `python`'s
    environment."""
    return [python, "-m", "pip", "install", f"jax[{extra}]=={jax_version}"]


def without_install(argv: Sequence[str]) -> list[str]:
    """`argv` without --install and --cuda (with its value): what the fresh process is started with."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--install" or arg.startswith("--cuda="):
            continue
        elif arg == "--cuda":
            skip = True
        else:
            out.append(arg)
    return out


def install_and_rerun(args: argparse.Namespace, argv: Sequence[str], log, run=None) -> int:
    """pip installs the CUDA build, then runs this module again in a fresh process; its exit status. `run`:
    subprocess.run by default."""
    run = run or subprocess.run
    jax_version = installed_version("jax")
    if jax_version is None:
        raise UserError(f"jax is not installed in {sys.prefix}: run `make install` first")
    override = args.cuda or os.environ.get(JAX_CUDA_ENV) or None
    extra = choose_extra(override, jax_version, cuda_extras())
    command = pip_command(extra, jax_version)
    log(f"{PROG}: installing the CUDA build of jax {jax_version}: {' '.join(command)}")
    # pip's output goes to stderr: stdout is the table's.
    if run(command, stdout=sys.stderr, stderr=sys.stderr).returncode != 0:
        raise UserError(f"`{' '.join(command[1:])}` failed (see pip's output above)")
    rerun = [sys.executable, "-m", "bench.accelerator", *without_install(argv)]
    sys.stdout.flush()
    sys.stderr.flush()
    return run(rerun).returncode


# -------------------------------------------------------------------------------------------- time budget


class Budget:
    """A deadline for the whole run; a row runs only if the previous row of its part predicts it will fit."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def skip_reason(self, predicted_s: float, share: float = 1.0) -> str | None:
        """Why the next row, predicted to take `predicted_s`, is skipped (None: it runs). `share`: the
        fraction of the budget its part may use."""
        limit = self.seconds * share
        left = limit - self.elapsed()
        if left <= 0 or predicted_s > left:
            part = "" if share == 1.0 else f" ({share:.0%} of it for this part)"
            previous = f", the previous row took {predicted_s:.0f} s" if predicted_s else ""
            return f"skipped: time budget {self.seconds:.0f} s{part}, {max(left, 0):.0f} s left{previous}"
        return None


def run_rows(
    specs: Sequence[dict[str, Any]],
    measure: Callable[[dict[str, Any]], dict[str, Any]],
    budget: Budget,
    log,
    share: float = 1.0,
) -> list[dict[str, Any]]:
    """`measure(spec)` for each spec in turn, merged into the spec, with its wall time; a row the budget
    cannot fit gets `skipped`, one that raises gets `error` (one line), and the rest still run."""
    rows, predicted = [], 0.0
    for spec in specs:
        reason = budget.skip_reason(predicted, share)
        if reason is not None:
            log(f"  {_spec_name(spec)}: {reason}")
            rows.append({**spec, "skipped": reason})
            continue
        started = budget.clock()
        try:
            row = {**spec, **measure(spec)}
        except Exception as err:  # One failed row (e.g. out of memory) leaves the others' numbers.
            message = (str(err).strip().splitlines() or [type(err).__name__])[0]
            log(f"  {_spec_name(spec)}: error: {type(err).__name__}: {message}")
            row = {**spec, "error": f"{type(err).__name__}: {message}"}
        row["wall_s"] = budget.clock() - started
        predicted = row["wall_s"]
        rows.append(row)
    return rows


def _spec_name(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in spec.items())


# ------------------------------------------------------------------------------------------- measurements


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures."""

    sinusoid_tasks: tuple[int, ...]
    sinusoid_reps: int
    omniglot_settings: tuple[tuple[int, int], ...]
    omniglot_variants: tuple[str, ...]
    omniglot_steps: int
    omniglot_overrides: tuple[tuple[str, Any], ...]
    quick: bool

    @classmethod
    def make(cls, quick: bool) -> Plan:
        """The sizes; the Omniglot settings and --quick's tiny net are bench/omniglot.py's (imports JAX)."""
        from bench import omniglot

        if quick:
            return cls(
                QUICK_SINUSOID_TASKS,
                QUICK_SINUSOID_REPS,
                omniglot.QUICK_SETTINGS,
                OMNIGLOT_VARIANTS,
                QUICK_OMNIGLOT_STEPS,
                tuple(omniglot.QUICK_OVERRIDES.items()),
                True,
            )
        return cls(
            SINUSOID_TASKS, SINUSOID_REPS, omniglot.SETTINGS, OMNIGLOT_VARIANTS, OMNIGLOT_STEPS, (), False
        )


def sinusoid_settings(plan: Plan):
    from bench import settings as settings_lib

    base = settings_lib.QUICK if plan.quick else settings_lib.DEFAULT
    budget_s = settings_lib.QUICK.budget_s if plan.quick else SINUSOID_ROW_BUDGET_S
    return dataclasses.replace(base, reps=plan.sinusoid_reps, budget_s=budget_s)


def measure_sinusoid(plan: Plan, platform: str, budget: Budget, log) -> dict[str, Any]:
    """The project's meta-step at each meta-batch (float64, as the notebook's problem)."""
    import jax

    from bench import settings as settings_lib
    from bench import throughput

    settings = sinusoid_settings(plan)
    mapping = "map" if platform == "cpu" else "vmap"
    config = settings_lib.make_config(settings)
    jax.config.update("jax_enable_x64", config.model.dtype == "float64")
    problem = settings_lib.Problem.create(config)

    def one(spec):
        row = throughput.project_step(settings, spec["num_tasks"], mapping, log)
        return {"mapping": mapping, **row}

    log(f"{PROG}: sinusoid meta-step, tasks {mapping}ped, meta-batches {list(plan.sinusoid_tasks)}")
    specs = [{"num_tasks": n} for n in plan.sinusoid_tasks]
    return dict(
        mapping=mapping,
        dtype=config.model.dtype,
        hidden_sizes=list(settings.hidden_sizes),
        num_params=settings_lib.num_params(problem.meta_params),
        l2reg=settings.l2reg,
        inner_maxiter=settings.inner_maxiter,
        inner_tol=settings.inner_tol,
        linesearch=settings.linesearch,
        reps=settings.reps,
        rows=run_rows(specs, one, budget, log, share=SINUSOID_SHARE),
    )


def measure_omniglot(plan: Plan, budget: Budget, log) -> dict[str, Any]:
    """bench/omniglot.py's meta-step for each (width, meta-batch) and variant, on one device (float32)."""
    import jax

    from bench import omniglot
    from trainer import config as config_lib

    jax.config.update("jax_enable_x64", False)  # As `python -m bench.omniglot` runs it.

    def one(spec):
        solver, conv, mapping = spec["variant"].split("/")
        config = omniglot.make_config(spec["width"], spec["meta_batch"], solver, conv, mapping, 1)
        config = config_lib.with_fields(config, dict(plan.omniglot_overrides))
        row = omniglot.measure(config, plan.omniglot_steps, log)
        row["tasks_per_s"] = spec["meta_batch"] / row["step_s"]
        log(
            f"  omniglot {spec['variant']} width {spec['width']} T={spec['meta_batch']}: "
            f"{row['step_s']:.3f} s/step, {row['evaluations_per_task']:.1f} evaluations/task, "
            f"{row['gflops']:.1f} GFLOP/s"
        )
        return row

    log(f"{PROG}: omniglot meta-step, (width, meta-batch) {list(plan.omniglot_settings)}")
    specs = [
        {"width": width, "meta_batch": meta_batch, "variant": variant}
        for width, meta_batch in plan.omniglot_settings
        for variant in plan.omniglot_variants
    ]
    config = config_lib.with_fields(
        omniglot.make_config(64, 32, "lbfgs", "xla", "vmap", 1), dict(plan.omniglot_overrides)
    )
    return dict(
        steps=plan.omniglot_steps,
        conv_blocks=config.model.conv_blocks,
        image_size=config.tasks.image_size,
        inner_maxiter=config.inner.maxiter,
        cg_steps=config.meta_grad.solver_maxiter,
        overrides=dict(plan.omniglot_overrides),
        rows=run_rows(specs, one, budget, log),
    )


def select_platform(platform: str, quick: bool) -> None:
    """Before JAX starts its backends: only CPU for 'cpu' (with --quick: cheaper XLA compilation)."""
    import jax

    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
        if quick:
            from bench.run import QUICK_XLA_FLAGS

            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_log(name: str = "jax._src.xla_bridge"):
    """Holds back logger `name`'s warnings and errors (with their tracebacks) and yields the list of their
    records: where JAX reports a CUDA plugin that failed to start."""
    logger = logging.getLogger(name)
    handler, propagate = _Records(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def record_reason(record: logging.LogRecord) -> str:
    """A log record in one line: its exception's type and first line if it has one, else its message."""
    if record.exc_info and record.exc_info[1] is not None:
        err = record.exc_info[1]
        return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return (record.getMessage().strip().splitlines() or [""])[0]


def check_devices(platform: str, log):
    """The first device of `platform`, or a UserError saying why there is none (with the error of a CUDA
    plugin that failed to start, which JAX would otherwise log with a traceback)."""
    import jax

    with captured_log() as records:
        try:
            devices = jax.devices()
        except RuntimeError as err:
            devices, backend_error = None, (str(err).strip().splitlines() or [""])[0]
    reasons = [record_reason(r) for r in records]
    if devices is None:
        raise UserError(f"JAX could not start its backend ({'; '.join([backend_error, *reasons])})")
    if devices[0].platform != platform:
        plugins = [
            f"{name} {version}"
            for name in ("jax-cuda12-plugin", "jax-cuda13-plugin")
            if (version := installed_version(name))
        ]
        found = "; ".join([", ".join(plugins) or "no jax CUDA plugin installed", *reasons])
        raise UserError(
            f"no {platform.upper()} visible to JAX (it found {devices[0].platform}; {found}): run with --install "
            f"(make bench-gpu), or check the NVIDIA driver with nvidia-smi"
        )
    for reason in reasons:
        log(f"{PROG}: note: JAX logged: {reason}")
    return devices[0]


def machine(platform: str) -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    return dict(
        platform=platform,
        device_kind=device.device_kind,
        devices=len(jax.devices()),
        jax=jax.__version__,
        jaxlib=installed_version("jaxlib") or "not installed",
        cuda_plugins={
            name: version
            for name in ("jax-cuda12-plugin", "jax-cuda13-plugin")
            if (version := installed_version(name))
        },
        compile_cache=os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or jax.config.jax_compilation_cache_dir
        or "",
        python=sys.version.split()[0],
    )


# ----------------------------------------------------------------------------------------------- the table


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _not_measured(row: dict[str, Any]) -> str | None:
    if "skipped" in row:
        return row["skipped"]
    if "error" in row:
        return f"error: {row['error']}"
    return None


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: a header with the device and versions, one table per part."""
    m = results["machine"]
    plugins = ", ".join(f"{k} {v}" for k, v in m["cuda_plugins"].items()) or "no CUDA plugin"
    lines = [
        f"# Meta-step on {m['device_kind']} ({m['platform']})",
        "",
        f"{results['date']}; jax {m['jax']}, jaxlib {m['jaxlib']} ({plugins}); one device of {m['devices']}; "
        f"{results['mode']} mode; time budget {results['time_budget_s']:.0f} s, total {results['total_s']:.0f} s.",
        "",
    ]
    s = results["sinusoid"]
    widths = ", ".join(str(w) for w in (*s["hidden_sizes"], 1))
    lines += [
        f"## Sinusoid meta-step (tasks {s['mapping']}ped)",
        "",
        f"MLP [{widths}] ({s['num_params']} parameters), {s['dtype']}; inner L-BFGS ({s['linesearch']} line "
        f"search, lambda {s['l2reg']:g}, maxiter {s['inner_maxiter']}, tol {s['inner_tol']:g}), implicit "
        f"meta-gradient by CG. Step time: median [min–max] of up to {s['reps']} steps after the compiling and "
        "a warm-up call.",
        "",
        "| meta-batch | s/step | tasks/s | compile s | inner iterations mean / max |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in s["rows"]:
        note = _not_measured(row)
        if note:
            lines.append(f"| {row['num_tasks']} | {note} | | | |")
            continue
        t = row["step_s"]
        lines.append(
            f"| {row['num_tasks']} | {_fmt(t['median'])} [{_fmt(t['min'])}–{_fmt(t['max'])}] "
            f"({len(t['samples'])}) | {_fmt(row['tasks_per_s'])} | {_fmt(row['compile_s'])} | "
            f"{row['inner_iterations_mean']:.0f} / {row['inner_iterations_max']:.0f} |"
        )
    o = results["omniglot"]
    lines += [
        "",
        "## Omniglot 5-way 1-shot meta-step",
        "",
        f"Conv net: {o['conv_blocks']} block(s) of the given width; {o['image_size']}x{o['image_size']} random "
        f"images; float32; inner solver at most {o['inner_maxiter']} iteration(s); {o['cg_steps']} CG step(s)"
        + (" (shrunk by --quick)" if o["overrides"] else "")
        + ". bench/omniglot.py's measurement: median [min–max] of "
        f"{o['steps']} step(s) after the compiling call; GFLOP/s from XLA's count of the maths (evaluations x "
        "support loss and gradient, CG steps x Hessian-vector product, query gradient).",
        "",
        "| width | meta-batch | solver/conv/mapping | s/step | tasks/s | first call s | evaluations/task "
        "| GFLOP/step | GFLOP/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in o["rows"]:
        head = f"| {row['width']} | {row['meta_batch']} | {row['variant']} |"
        note = _not_measured(row)
        if note:
            lines.append(f"{head} {note} | | | | | |")
            continue
        lines.append(
            f"{head} {_fmt(row['step_s'])} [{_fmt(row['step_s_min'])}–{_fmt(row['step_s_max'])}] | "
            f"{_fmt(row['tasks_per_s'])} | {_fmt(row['first_call_s'])} | {row['evaluations_per_task']:.1f} | "
            f"{_fmt(row['gflop_per_step'])} | {_fmt(row['gflops'])} |"
        )
    return "\n".join(lines)


def write(results: dict[str, Any], table: str, out_dir: str, now: datetime.datetime) -> str:
    """Writes <out_dir>/<date>_<time>_accelerator[-quick].md and .json; returns the path without suffix."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(
        out_dir,
        now.strftime("%Y-%m-%d_%H%M%S") + "_accelerator" + ("-quick" if results["mode"] == "quick" else ""),
    )
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    return stem


# ------------------------------------------------------------------------------------------------- command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--install",
        action="store_true",
        help="first pip install the CUDA build of the installed jax version (chosen from nvidia-smi)",
    )
    parser.add_argument(
        "--cuda",
        help=f"with --install: the jax extra to install, e.g. cuda12 or cuda13 (default: ${JAX_CUDA_ENV}, else "
        "from the driver's CUDA version)",
    )
    parser.add_argument("--platform", choices=("gpu", "cpu"), default="gpu", help="where to measure")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check, not a measurement")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where the .md and .json go")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=DEFAULT_TIME_BUDGET_S,
        help="skip the rows that would end past this many seconds of measuring (default %(default)g)",
    )
    return parser.parse_args(argv)


def measure_all(args: argparse.Namespace, log) -> dict[str, Any]:
    select_platform(args.platform, args.quick)
    check_devices(args.platform, log)
    plan = Plan.make(args.quick)
    now = datetime.datetime.now()
    info = machine(args.platform)
    log(f"{PROG}: {info['device_kind']} ({args.platform}), jax {info['jax']}, jaxlib {info['jaxlib']}")
    budget = Budget(args.time_budget_s)
    results = dict(
        mode="quick" if args.quick else "default",
        date=now.strftime("%Y-%m-%d %H:%M:%S"),
        machine=info,
        time_budget_s=args.time_budget_s,
        plan=dataclasses.asdict(plan),
    )
    results["sinusoid"] = measure_sinusoid(plan, args.platform, budget, log)
    results["omniglot"] = measure_omniglot(plan, budget, log)
    results["total_s"] = budget.elapsed()
    table = markdown(results)
    print(table, flush=True)
    stem = write(results, table, args.out_dir, now)
    log(f"{PROG}: wrote {stem}.md and {stem}.json in {results['total_s']:.0f} s")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        if args.install:
            if args.platform != "gpu":
                raise UserError("--install installs JAX's CUDA build: use it with --platform gpu")
            return install_and_rerun(args, argv, log)
        measure_all(args, log)
        return 0
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
