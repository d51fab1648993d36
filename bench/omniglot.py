"""The Omniglot meta-step: seconds per step, inner evaluations per task and achieved GFLOP/s, per inner solver,
convolution implementation and task mapping, measured in one process (ratios within one run).

    python -m bench.omniglot                      # the paper setting: 5-way 1-shot, 4 x 64 conv, 32 tasks
    python -m bench.omniglot --width 32 --meta-batch 16
    python -m bench.omniglot --variants lbfgs/xla/map,gd/patches/map --steps 3
    python -m bench.omniglot --quick --json rows.json   # a tiny net: a smoke check (make bench --quick)

Images are random (the step's cost does not depend on them), so no data set is needed. The step is the
trainer's own (parallel.make_backend, shard_map over `--devices` CPU devices, one per usable core by
default). FLOPs are counted by XLA's cost analysis of loop-free pieces of the model with XLA's convolution
(the same count for every variant): one evaluation of the support loss
with its gradient (an inner iteration costs one or more: `inner/evaluations_mean` counts them), one
Hessian-vector product (one per CG step), the query gradient; a while loop's body would be counted once.
The machine's attainable float32 rate ("peak") is measured beside it: a large matmul on every device at once.
`make bench` runs this module in a subprocess per setting (`section`), so its devices and dtype are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _cores = len(os.sched_getaffinity(0))
    _devices = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--devices=")), _cores)
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_devices}"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import omniglot as omniglot_configs  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import families, mapping, optim, parallel  # noqa: E402
from trainer import model as model_lib  # noqa: E402
from trainer import omniglot as omniglot_lib  # noqa: E402
from trainer import train_step as train_step_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = (
    "lbfgs/xla/map",
    "gd/xla/map",
    "lbfgs/patches/map",
    "gd/patches/map",
    "lbfgs/patches/vmap",
    "gd/patches/vmap",
)
SETTINGS = ((64, 32), (32, 16))  # (conv width, meta-batch): the paper's setting, then the cheaper one.
# --quick: a net that compiles in seconds (a smoke check of the measurement; its numbers mean little).
QUICK_SETTINGS = ((8, 4),)
QUICK_OVERRIDES = {
    "model.conv_blocks": 1,
    "tasks.image_size": 14,
    "inner.maxiter": 2,
    "inner.linesearch": "backtracking",
    "meta_grad.solver_maxiter": 1,
}
QUICK_VARIANTS = ("lbfgs/xla/map", "gd/patches/vmap")  # Each solver, convolution and mapping once.


def make_config(
    width: int, meta_batch: int, solver: str, conv: str, mapping: str, devices: int, overrides=None
):
    c = omniglot_configs.get_config("ways=5,shots=1")
    return config_lib.with_fields(
        c,
        {
            "model.conv_width": width,
            "model.conv_impl": conv,
            "inner.solver": solver,
            "train.meta_batch_size": meta_batch,
            "parallel.task_mapping": mapping,
            "parallel.num_devices": devices,
            **(overrides or {}),
        },
    )


def peak_gflops(size: int = 1536, reps: int = 5) -> float:
    """float32 GFLOP/s of a size x size matmul on every local device at once (median of `reps`)."""
    n = jax.local_device_count()
    a = jnp.ones((n, size, size), jnp.float32)
    matmul = jax.pmap(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - started)
    return n * 2 * size**3 / float(np.median(times)) / 1e9


def _synthetic_data(config, rng):
    t = config.tasks
    shape = (t.num_train_classes, omniglot_lib.OMNIGLOT_DRAWERS, t.image_size, t.image_size)
    return {
        "images": rng.integers(0, 256, shape, dtype=np.uint8),
        "ids": np.arange(1, shape[0] + 1, dtype=np.int32),
    }


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def piece_flops(config, model, theta, task) -> dict[str, float]:
    """FLOPs of one support-loss evaluation with gradient, one Hessian-vector product, one query gradient."""
    family_loss = model_lib.cross_entropy_loss
    support, query = families.support(task), families.query(task)
    lam = config.inner.l2reg
    objective = lambda x: (
        family_loss(model, x, *support)
        + 0.5
        * lam
        * sum(jnp.vdot(a - b, a - b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(theta), strict=True))
    )
    hvp = lambda x, v: jax.jvp(jax.grad(objective), (x,), (v,))[1]
    return {
        "evaluation": _flops(jax.value_and_grad(objective), theta),
        "hvp": _flops(hvp, theta, theta),
        "query_grad": _flops(jax.grad(lambda x: family_loss(model, x, *query)), theta),
    }


def measure(config, steps: int, log) -> dict:
    model = model_lib.make_model(config)
    keys = families.split_keys(config.seed)
    optimizer, _ = optim.make_optimizer(config)
    data = _synthetic_data(config, np.random.default_rng(0))
    family = families.get_family(config)
    local_step = train_step_lib.make_train_step(
        config, model, family, optimizer, mapping.task_mapping(config)
    )
    backend = parallel.make_backend(config, local_step, family, data)
    theta = model_lib.init_params(model, keys["init"])
    host = jax.tree.map(np.asarray, train_step_lib.create_train_state(theta, optimizer, keys["train"]))
    state = backend.put_state(host)
    task_key = jnp.asarray(host.task_key)
    started = time.perf_counter()
    state, metrics = backend.step(state, backend.sample_tasks(task_key, 0))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - started
    times, evaluations, iterations = [], [], []
    for step in range(1, steps + 1):
        batch = jax.block_until_ready(backend.sample_tasks(task_key, step))
        started = time.perf_counter()
        state, metrics = backend.step(state, batch)
        metrics = backend.metrics_to_host(metrics)
        times.append(time.perf_counter() - started)
        evaluations.append(float(metrics["inner_evaluations_mean"]))
        iterations.append(float(metrics["inner_iterations_mean"]))
    one_task = jax.tree.map(lambda a: np.asarray(a)[0], backend.sample_tasks(task_key, 0))
    # The maths' FLOPs, the same for every variant: counted on XLA's convolution (patches add copies).
    reference_model = model_lib.make_model(config_lib.with_fields(config, {"model.conv_impl": "xla"}))
    flops = piece_flops(config, reference_model, theta, one_task)
    evals = float(np.mean(evaluations))
    cg = config.meta_grad.solver_maxiter
    step_flops = config.train.meta_batch_size * (
        evals * flops["evaluation"] + cg * flops["hvp"] + flops["query_grad"]
    )
    seconds = float(np.median(times))
    return {
        "step_s": seconds,
        "step_s_min": float(np.min(times)),
        "step_s_max": float(np.max(times)),
        "first_call_s": compile_s,
        "inner_iterations": float(np.mean(iterations)),
        "evaluations_per_task": evals,
        "gflop_per_step": step_flops / 1e9,
        "gflops": step_flops / 1e9 / seconds,
        "flops": flops,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.omniglot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--devices", type=int, default=len(jax.devices()))
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first (compiling) call")
    parser.add_argument("--variants", help="solver/conv/mapping,... (default: DEFAULT_VARIANTS)")
    parser.add_argument("--quick", action="store_true", help="a tiny net: a smoke check, not a measurement")
    parser.add_argument("--json", help="also write the rows and the machine's peak as JSON to this file")
    parser.add_argument(
        "--torch-python",
        default=os.environ.get("BENCH_TORCH_PYTHON", sys.executable),
        help="a Python with PyTorch for the official code's step (bench/torch_imaml.py; default "
        "$BENCH_TORCH_PYTHON, else this Python); without PyTorch that row is skipped",
    )
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    variants = args.variants or ",".join(QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    overrides = QUICK_OVERRIDES if args.quick else None
    rows = []
    for variant in variants.split(","):
        solver, conv, mapping = variant.split("/")
        config = make_config(args.width, args.meta_batch, solver, conv, mapping, args.devices, overrides)
        log(f"omniglot bench: {variant} ...")
        row = {"variant": variant, **measure(config, args.steps, log)}
        log(
            f"  {row['step_s']:.3f} s/step, {row['evaluations_per_task']:.1f} evaluations/task, {row['gflops']:.1f} GFLOP/s"
        )
        rows.append(row)
    peak = peak_gflops(256 if args.quick else 1536)
    result = dict(
        width=args.width,
        meta_batch=args.meta_batch,
        devices=args.devices,
        steps=args.steps,
        quick=args.quick,
        platform=jax.default_backend(),
        peak_gflops=peak,
        rows=rows,
        pytorch={"skipped": "--quick (its net is not the official one)"}
        if args.quick
        else pytorch_reference(args.torch_python, args.width, args.meta_batch, args.devices, args.steps, log),
    )
    print("\n".join(table(result)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return rows


def pytorch_reference(python: str, width: int, meta_batch: int, threads: int, steps: int, log) -> dict:
    """The official PyTorch code's meta-step at the same setting on `threads` threads (bench/torch_imaml.py,
    in a subprocess of `python`), or {"skipped": why}."""
    try:
        found = (
            subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=120).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if not found:
        return {
            "skipped": f"PyTorch is not importable by {python} (set BENCH_TORCH_PYTHON to one that has it)"
        }
    log(f"omniglot bench: the official PyTorch step ({threads} threads) ...")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        command = [python, os.path.join(REPO, "bench", "torch_imaml.py"), "--json", out]
        command += ["--width", str(width), "--meta-batch", str(meta_batch), "--threads", str(threads)]
        proc = subprocess.run(command + ["--steps", str(max(steps, 2))], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"skipped": f"bench/torch_imaml.py failed: {proc.stderr.strip()[-300:]}"}
        with open(out) as f:
            return json.load(f)


def table(result: dict) -> list[str]:
    """Markdown lines of one setting's rows (the first row is the ratios' reference)."""
    rows, peak = result["rows"], result["peak_gflops"]
    lines = [
        f"Omniglot 5-way 1-shot meta-step, conv width {result['width']}, {result['meta_batch']} tasks, "
        f"{result['devices']} {result['platform'].upper()} device(s), jax {jax.__version__}; median of "
        f"{result['steps']} steps{' (--quick: a 1-block net on 14x14 images)' if result['quick'] else ''}; "
        f"peak (a float32 matmul on every device) {peak:.0f} GFLOP/s",
        "",
        "| solver/conv/mapping | s/step [min-max] | vs first | first call s | inner it. | evaluations/task "
        "| GFLOP/step | GFLOP/s | of peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]["step_s"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['step_s']:.3f} [{r['step_s_min']:.3f}-{r['step_s_max']:.3f}] | "
            f"{base / r['step_s']:.2f}x | {r['first_call_s']:.1f} | {r['inner_iterations']:.1f} | "
            f"{r['evaluations_per_task']:.1f} | {r['gflop_per_step']:.1f} | {r['gflops']:.1f} | "
            f"{100 * r['gflops'] / peak:.0f}% |"
        )
    torch_row = result.get("pytorch") or {"skipped": "not measured"}
    if "skipped" in torch_row:
        lines += ["", f"The official PyTorch code's step: skipped ({torch_row['skipped']})."]
    else:
        lines += [
            "",
            f"The official PyTorch code's step at the same setting (bench/torch_imaml.py, torch "
            f"{torch_row['torch']}, {torch_row['threads']} threads, median of {torch_row['steps']}): "
            f"{torch_row['step_s']:.3f} s [{torch_row['step_s_min']:.3f}-{torch_row['step_s_max']:.3f}]; "
            + ", ".join(f"{r['variant']} {torch_row['step_s'] / r['step_s']:.2f}x as fast" for r in rows),
        ]
    return lines


def section(quick: bool, devices: int, log, timeout_s: float = 1800) -> dict:
    """`make bench`'s Omniglot section: this module in a subprocess per setting (its own devices, float32)."""
    results = []
    for width, meta_batch in QUICK_SETTINGS if quick else SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            command = [sys.executable, "-m", "bench.omniglot", f"--devices={devices}", "--json", out]
            command += ["--width", str(width), "--meta-batch", str(meta_batch)]
            command += ["--quick", "--steps", "1"] if quick else []
            env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
            env["XLA_FLAGS"] = re.sub(
                r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
            ).strip()
            log(f"  omniglot: width {width}, meta-batch {meta_batch}")
            try:  # Progress goes to this process's stderr; the rows come back in the JSON file.
                proc = subprocess.run(
                    command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, timeout=timeout_s
                )
                error = f"exit status {proc.returncode}" if proc.returncode != 0 else None
            except subprocess.TimeoutExpired:
                error = f"timed out after {timeout_s:.0f} s"
            if error:
                results.append(dict(width=width, meta_batch=meta_batch, error=error))
                continue
            with open(out) as f:
                results.append(json.load(f))
    return dict(settings=results)


if __name__ == "__main__":
    main()
