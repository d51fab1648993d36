"""The config schema: every field with its default and meaning, and validation before any work.

Config files in `configs/` start from `default_config()` and override only what differs.
`validate(config)` raises `ConfigError` naming the field and the allowed values; the CLI calls it
before JAX compiles anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

ESTIMATORS = ("implicit", "unrolled", "first_order")
LINEAR_SOLVERS = ("cg", "bicgstab", "gmres", "normal_cg")
LINESEARCHES = ("zoom", "backtracking", "hager-zhang")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
BACKENDS = ("shard_map", "pmap", "none")
ACTIVATIONS = ("swish", "relu", "tanh", "gelu")
DTYPES = ("float32", "float64")
FAMILIES = ("sinusoid",)


class ConfigError(ValueError):
    """A config field has a value the trainer cannot use."""


def default_config() -> ml_collections.ConfigDict:
    """The default experiment: sinusoid iMAML, a fresh meta-batch of 32 tasks each step."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Base PRNG seed: model init, training tasks and held-out tasks derive from it.

    c.model = ml_collections.ConfigDict()
    c.model.hidden_sizes = (20, 20, 20)  # Widths of the hidden layers of the MLP (output width is 1).
    c.model.activation = "swish"  # One of ACTIVATIONS.
    c.model.dtype = "float64"  # Parameter and compute dtype; float64 enables jax_enable_x64.

    c.tasks = ml_collections.ConfigDict()
    c.tasks.family = "sinusoid"  # Task family; y = amplitude * sin(frequency * x + phase).
    c.tasks.amplitude_min = 0.1  # Amplitude range (the notebook's: [0.1, 0.5]).
    c.tasks.amplitude_max = 0.5
    c.tasks.frequency_min = 0.5  # Frequency range (the notebook calls it "phase": [0.5, pi]).
    c.tasks.frequency_max = math.pi
    c.tasks.phase_min = 0.0  # Phase-shift range (Finn et al. 2017: [0, pi]).
    c.tasks.phase_max = 0.0
    c.tasks.x_min = -5.0  # Inputs are uniform in [x_min, x_max].
    c.tasks.x_max = 5.0
    c.tasks.num_support = 6  # Support (inner training) points per task, K.
    c.tasks.num_query = 6  # Query (outer evaluation) points per task.
    c.tasks.num_fixed_train_tasks = 0  # 0: fresh tasks every step; N > 0: a fixed pool of N training tasks.

    c.inner = ml_collections.ConfigDict()
    c.inner.solver = "lbfgs"  # Inner solver; see trainer/inner_solver.py.
    c.inner.l2reg = 1.0  # lambda of the proximal term (lambda/2)||x - theta||^2; > 0 for implicit gradients.
    c.inner.maxiter = 500  # Iteration cap of the inner solver.
    c.inner.tol = 1e-8  # Stop when ||grad L_support(x) + lambda (x - theta)|| <= tol.
    c.inner.history_size = 10  # LBFGS memory.
    c.inner.linesearch = "zoom"  # LBFGS line search, one of LINESEARCHES.
    c.inner.maxls = 15  # Maximum line-search steps per LBFGS iteration.
    c.inner.unrolled_stepsize = 0.05  # Step of the unrolled gradient-descent solver (estimator=unrolled).

    c.meta_grad = ml_collections.ConfigDict()
    c.meta_grad.estimator = "implicit"  # One of ESTIMATORS.
    # Linear solver for (Hessian of L_support at x* + lambda I) v = g; the matrix is SPD, so CG.
    c.meta_grad.linear_solver = "cg"
    c.meta_grad.solver_maxiter = 200  # Iteration cap of that linear solve.
    c.meta_grad.solver_tol = 1e-10  # Its tolerance (jaxopt's default 1e-5 gave 68% error in our measurements).

    c.outer = ml_collections.ConfigDict()
    c.outer.optimizer = "adam"  # One of OPTIMIZERS.
    c.outer.learning_rate = 1e-3  # Peak learning rate of the meta-parameters.
    c.outer.schedule = "constant"  # One of SCHEDULES.
    c.outer.warmup_steps = 0  # Linear warm-up steps (warmup_cosine only).
    c.outer.grad_clip_norm = 0.0  # Clip the meta-gradient to this global norm; 0 disables clipping.
    c.outer.weight_decay = 0.0  # Decoupled weight decay (adamw only).

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 500  # Number of meta-steps (outer updates).
    c.train.meta_batch_size = 32  # Tasks per meta-step, split across devices.

    c.parallel = ml_collections.ConfigDict()
    c.parallel.backend = "shard_map"  # One of BACKENDS; "none" runs on one device with vmap only.
    c.parallel.num_devices = 0  # Devices on the task axis; 0 means all devices.

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 100  # Held-out evaluation period (and at the end); 0 evaluates only at the end.
    c.eval.num_tasks = 100  # Held-out tasks per evaluation (drawn from a key disjoint from training).

    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 10  # Period of the metrics written to metrics.jsonl and printed.

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # Checkpoint period (and at the end); 0 saves only at the end.
    c.checkpoint.max_to_keep = 3  # Number of checkpoints kept.
    c.checkpoint.async_save = True  # Save in the background while training continues.
    return c


def _choice(allowed: Sequence[str]) -> Callable[[Any], str | None]:
    def check(value):
        return None if value in allowed else f"one of {list(allowed)}"

    return check


def _int(minimum: int) -> Callable[[Any], str | None]:
    def check(value):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return None if ok else f"an integer >= {minimum}"

    return check


def _positive(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return None if ok else "a finite number > 0"


def _non_negative(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return None if ok else "a finite number >= 0"


def _finite(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else "a finite number"


def _widths(value) -> str | None:
    ok = isinstance(value, (tuple, list)) and all(isinstance(w, int) and w > 0 for w in value)
    return None if ok else "a sequence of positive integers"


def _bool(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": _int(0),
    "model.hidden_sizes": _widths,
    "model.activation": _choice(ACTIVATIONS),
    "model.dtype": _choice(DTYPES),
    "tasks.family": _choice(FAMILIES),
    "tasks.amplitude_min": _finite,
    "tasks.amplitude_max": _finite,
    "tasks.frequency_min": _finite,
    "tasks.frequency_max": _finite,
    "tasks.phase_min": _finite,
    "tasks.phase_max": _finite,
    "tasks.x_min": _finite,
    "tasks.x_max": _finite,
    "tasks.num_support": _int(1),
    "tasks.num_query": _int(1),
    "tasks.num_fixed_train_tasks": _int(0),
    "inner.solver": _choice(("lbfgs",)),
    "inner.l2reg": _positive,
    "inner.maxiter": _int(1),
    "inner.tol": _positive,
    "inner.history_size": _int(1),
    "inner.linesearch": _choice(LINESEARCHES),
    "inner.maxls": _int(1),
    "inner.unrolled_stepsize": _positive,
    "meta_grad.estimator": _choice(ESTIMATORS),
    "meta_grad.linear_solver": _choice(LINEAR_SOLVERS),
    "meta_grad.solver_maxiter": _int(1),
    "meta_grad.solver_tol": _positive,
    "outer.optimizer": _choice(OPTIMIZERS),
    "outer.learning_rate": _positive,
    "outer.schedule": _choice(SCHEDULES),
    "outer.warmup_steps": _int(0),
    "outer.grad_clip_norm": _non_negative,
    "outer.weight_decay": _non_negative,
    "train.num_steps": _int(1),
    "train.meta_batch_size": _int(1),
    "parallel.backend": _choice(BACKENDS),
    "parallel.num_devices": _int(0),
    "eval.every_steps": _int(0),
    "eval.num_tasks": _int(1),
    "logging.every_steps": _int(1),
    "checkpoint.every_steps": _int(0),
    "checkpoint.max_to_keep": _int(1),
    "checkpoint.async_save": _bool,
}


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _nearest_multiples(value: int, divisor: int) -> list[int]:
    below = (value // divisor) * divisor
    return sorted({m for m in (below, below + divisor) if m > 0})


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field against the schema; raises ConfigError naming the first bad field."""
    flat = _flatten(config)
    unknown = sorted(set(flat) - set(RULES))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(RULES)}")
    missing = sorted(set(RULES) - set(flat))
    if missing:
        raise ConfigError(f"config is missing field(s) {missing}; start from trainer.config.default_config()")
    for name, rule in RULES.items():
        expected = rule(flat[name])
        if expected is not None:
            raise ConfigError(f"config field '{name}' = {flat[name]!r} is invalid: expected {expected}")
    for low, high in (("amplitude_min", "amplitude_max"), ("frequency_min", "frequency_max"),
                      ("phase_min", "phase_max"), ("x_min", "x_max")):
        if flat[f"tasks.{low}"] > flat[f"tasks.{high}"]:
            raise ConfigError(f"config field 'tasks.{low}' = {flat[f'tasks.{low}']} must be <= "
                              f"'tasks.{high}' = {flat[f'tasks.{high}']}")
    fixed = flat["tasks.num_fixed_train_tasks"]
    if fixed and flat["train.meta_batch_size"] > fixed:
        raise ConfigError(f"config field 'train.meta_batch_size' = {flat['train.meta_batch_size']} exceeds "
                          f"'tasks.num_fixed_train_tasks' = {fixed}: a step cannot use a task twice")
    if flat["model.dtype"] == "float32" and flat["inner.tol"] < 1e-7:
        raise ConfigError(f"config field 'inner.tol' = {flat['inner.tol']} is unreachable in float32: "
                          "expected >= 1e-7, or model.dtype = 'float64'")
    return config


def check_device_count(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The meta-batch must split evenly over the task axis; fails before any compilation."""
    batch = config.train.meta_batch_size
    if batch % num_devices:
        raise ConfigError(
            f"config field 'train.meta_batch_size' = {batch} is not divisible by the {num_devices} devices on the "
            f"'tasks' axis; nearest valid sizes: {_nearest_multiples(batch, num_devices)} "
            "(or set parallel.num_devices)")
    if config.tasks.num_fixed_train_tasks and config.tasks.num_fixed_train_tasks < batch:
        raise ConfigError("tasks.num_fixed_train_tasks must be >= train.meta_batch_size")


def maths_fields() -> tuple[str, ...]:
    """Fields whose change alters the optimisation problem (refused on resume unless overridden)."""
    return tuple(name for name in RULES if name.split(".")[0] in ("seed", "model", "tasks", "inner", "meta_grad",
                                                                   "outer")
                 or name == "train.meta_batch_size")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serialisable dict of the resolved config."""
    def convert(value):
        if isinstance(value, ml_collections.ConfigDict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        return value

    return convert(config)
