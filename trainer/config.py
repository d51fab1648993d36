"""The config schema: every field with its default and meaning, and validation before any work.

Config files in `configs/` start from `default_config()` and override only what differs.
`validate(config)` raises `ConfigError` naming the field and the allowed values; the CLI calls it
before JAX compiles anything.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

ESTIMATORS = ("implicit", "unrolled", "first_order")
INNER_SOLVERS = ("lbfgs", "gd")
DROP_POLICIES = ("unusable", "nonfinite", "none")
LINEAR_SOLVERS = ("cg", "bicgstab", "gmres", "normal_cg")
LINESEARCHES = ("zoom", "backtracking", "hager-zhang")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
BACKENDS = ("shard_map", "pmap", "none")
TASK_MAPPINGS = ("auto", "vmap", "map")
ACTIVATIONS = ("swish", "relu", "tanh", "gelu")
DTYPES = ("float32", "float64")
FAMILIES = ("sinusoid", "omniglot")  # Built-in task families; others by import path (trainer/families.py).
NORMALIZATIONS = ("layer", "batch", "none")
CONV_IMPLEMENTATIONS = ("xla", "patches")
SPLITS = ("random", "background")


class ConfigError(ValueError):
    """A config field has a value the trainer cannot use."""


def default_config() -> ml_collections.ConfigDict:
    """The default experiment: sinusoid iMAML, a fresh meta-batch of 32 tasks each step."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Base PRNG seed: model init, training tasks and held-out tasks derive from it.
    # Compiled programs kept for a resumed or repeated run: JAX's persistent compilation cache (when the
    # JAX_COMPILATION_CACHE_DIR variable is set, JAX uses that instead) and the train step's executable
    # (trainer/executables.py). "" means <workdir>/jax_cache, "none" keeps neither.
    c.compile_cache_dir = ""

    c.model = ml_collections.ConfigDict()
    c.model.hidden_sizes = (20, 20, 20)  # Widths of the hidden layers of the MLP (output width is 1).
    c.model.activation = "swish"  # One of ACTIVATIONS.
    c.model.dtype = "float64"  # Parameter and compute dtype; float64 enables jax_enable_x64.
    # The conv net of classification families (omniglot), as in MAML/iMAML: conv_blocks x [3x3 conv of
    # conv_width filters, stride 2; normalization; activation], spatial mean, linear head of num_ways logits.
    c.model.conv_width = 64  # Filters per conv block.
    c.model.conv_blocks = 4  # Number of conv blocks.
    # The convolutions' implementation, one of CONV_IMPLEMENTATIONS (the same maths and parameters): "xla",
    # flax's nn.Conv (XLA's convolution); "patches", image patches times the kernel as one matmul.
    c.model.conv_impl = "xla"
    # One of NORMALIZATIONS. "layer": per-image statistics (over height, width, channels), so an image's
    # output does not depend on the rest of the batch; "batch": statistics of the current batch only (MAML's
    # transductive batch norm, no running averages); "none". Running statistics would make the inner argmin
    # depend on state outside the parameters.
    c.model.normalization = "layer"

    c.tasks = ml_collections.ConfigDict()
    # Task family, one of FAMILIES or an import path "module.path:ClassName" of a class with the interface of
    # trainer/families.py (README: "Add your own tasks"). sinusoid: y = amplitude * sin(frequency * x + phase)
    # (the fields from amplitude_min to x_max); omniglot: N-way K-shot character classification (num_ways to
    # rotate); an imported family: its own fields in tasks.options.
    c.tasks.family = "sinusoid"
    # The fields of an imported family, tasks.options.<name>: those it declares (its `default_options`), the
    # missing ones filled in with its defaults by validate(). Empty for the built-in families.
    c.tasks.options = ml_collections.ConfigDict()
    c.tasks.amplitude_min = 0.1  # Amplitude range (the notebook's: [0.1, 0.5]).
    c.tasks.amplitude_max = 0.5
    c.tasks.frequency_min = 0.5  # Frequency range (the notebook calls it "phase": [0.5, pi]).
    c.tasks.frequency_max = math.pi
    c.tasks.phase_min = 0.0  # Phase-shift range (Finn et al. 2017: [0, pi]).
    c.tasks.phase_max = 0.0
    c.tasks.x_min = -5.0  # Inputs are uniform in [x_min, x_max].
    c.tasks.x_max = 5.0
    c.tasks.num_support = 6  # Support (inner training) points per task (sinusoid) or per class (omniglot), K.
    c.tasks.num_query = 6  # Query (outer evaluation) points per task (sinusoid) or per class (omniglot).
    c.tasks.num_fixed_train_tasks = 0  # 0: fresh tasks every step; N > 0: a fixed pool of N training tasks.
    c.tasks.num_ways = 5  # Classes per task, N (omniglot).
    # Omniglot source: a folder holding images_background and images_evaluation as .npz arrays, unzipped
    # PNG folders or the canonical .zip archives; "" means cache_dir, where the archives are downloaded.
    c.tasks.data_dir = ""
    c.tasks.cache_dir = ""  # Downloads and the resized-image cache; "" means ~/.cache/imaml_trainer/omniglot.
    c.tasks.image_size = 28  # Images are resized once to image_size x image_size (and cached).
    # One of SPLITS. "random": the 1623 characters permuted with split_seed, the first num_train_classes for
    # meta-training, the next num_test_classes for meta-testing (the MAML/iMAML protocol: 1200 / 423);
    # "background": meta-train on the background set (964), meta-test on the evaluation set (659), as Lake.
    c.tasks.split = "random"
    c.tasks.split_seed = 0  # Seed of the character permutation (fixed, so every run uses the same split).
    c.tasks.num_train_classes = 1200  # Characters for meta-training.
    c.tasks.num_test_classes = 0  # Characters for meta-testing (held-out evaluation); 0 means all the others.
    c.tasks.rotate = True  # Rotate each class of a task by a random multiple of 90 degrees (train and test).

    c.inner = ml_collections.ConfigDict()
    # Inner solver, one of INNER_SOLVERS (trainer/inner_solver.py): "lbfgs", safeguarded L-BFGS with a line
    # search (stops at tol); "gd", iMAML-GD's fixed-step gradient descent (maxiter steps of gd_stepsize).
    c.inner.solver = "lbfgs"
    c.inner.l2reg = 1.0  # lambda of the proximal term (lambda/2)||x - theta||^2; > 0 for implicit gradients.
    c.inner.maxiter = 500  # Iteration cap of the inner solver.
    c.inner.tol = 1e-8  # Stop when ||grad L_support(x) + lambda (x - theta)|| <= tol.
    c.inner.history_size = 10  # LBFGS memory.
    c.inner.linesearch = "zoom"  # LBFGS line search, one of LINESEARCHES.
    c.inner.maxls = 15  # Maximum line-search steps per LBFGS iteration.
    c.inner.unrolled_stepsize = 0.005  # Step of the unrolled gradient-descent solver (estimator=unrolled).
    c.inner.gd_stepsize = 0.1  # Step of the "gd" inner solver.

    c.meta_grad = ml_collections.ConfigDict()
    c.meta_grad.estimator = "implicit"  # One of ESTIMATORS.
    # Linear solver for (Hessian of L_support at x* + lambda I) v = g; the matrix is SPD, so CG.
    c.meta_grad.linear_solver = "cg"
    c.meta_grad.solver_maxiter = 200  # Iteration cap of that linear solve.
    c.meta_grad.solver_tol = 1e-10  # Its tolerance (jaxopt's default, 1e-5, is far too loose: PITFALLS.md).
    # Added to the diagonal of that matrix: 0 is the exact implicit gradient lambda (H + lambda I)^{-1} g; a
    # positive damping keeps the solve well posed when the inner loss is non-convex (H has eigenvalues below
    # -lambda, e.g. a few fixed steps of a conv net) and few CG steps are taken, but biases the gradient.
    c.meta_grad.damping = 0.0
    # Tasks left out of a step's meta-gradient mean, one of DROP_POLICIES: "unusable" drops a task whose
    # inner solve returned a non-finite value or a residual above drop_residual_factor * inner.tol (its
    # implicit gradient is not a gradient); "nonfinite" drops only NaN/inf tasks; "none" keeps every task
    # (a NaN then stops the run). The mean is over the kept tasks of the whole meta-batch.
    c.meta_grad.drop_tasks = "unusable"
    c.meta_grad.drop_residual_factor = 1e3
    # The run stops when every task of a step is dropped, or when more than max_dropped_fraction of the tasks
    # are dropped in each of max_dropped_steps consecutive steps.
    c.meta_grad.max_dropped_fraction = 0.5
    c.meta_grad.max_dropped_steps = 10

    c.outer = ml_collections.ConfigDict()
    c.outer.optimizer = "adam"  # One of OPTIMIZERS.
    c.outer.learning_rate = 1e-3  # Peak learning rate of the meta-parameters.
    c.outer.schedule = "constant"  # One of SCHEDULES.
    c.outer.warmup_steps = 0  # Linear warm-up steps (warmup_cosine only).
    c.outer.grad_clip_norm = 0.0  # Clip the meta-gradient to this global norm; 0 disables clipping.
    c.outer.weight_decay = 0.0  # Decoupled weight decay (adamw only).
    # Adam's epsilon (adam, adamw), added to the root of the second moment: optax's default 1e-8 makes each
    # update about learning_rate in size whatever the gradient's scale; larger values damp the updates of
    # parameters whose gradients are small (the official iMAML code uses 1e-3).
    c.outer.adam_eps = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 500  # Number of meta-steps (outer updates).
    c.train.meta_batch_size = 32  # Tasks per meta-step, split across devices.
    # Warm start (--init_from): "OTHER_WORKDIR[:STEP]", whose meta-parameters a fresh run starts from (fresh
    # optimizer state, step 0); recorded here as "<absolute path>:<step>". "" starts from the random init.
    c.train.init_from = ""

    c.parallel = ml_collections.ConfigDict()
    c.parallel.backend = "shard_map"  # One of BACKENDS; "none" runs on one device.
    c.parallel.num_devices = 0  # Devices on the task axis; 0 means all devices.
    # How a device runs its tasks, one of TASK_MAPPINGS. "vmap": one vectorised program (for accelerators: every
    # task's L-BFGS iterates until the device's slowest task converges); "map": one task after another with
    # lax.map (each inner solve stops at its own convergence; the faster one on CPU, README "Benchmarks");
    # "auto": "map" on CPU, "vmap" on GPU/TPU (decided once, by trainer/mapping.py).
    c.parallel.task_mapping = "auto"

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 100  # Held-out evaluation period (and at the end); 0 evaluates only at the end.
    c.eval.num_tasks = 100  # Held-out tasks per evaluation (drawn from a key disjoint from training).
    c.eval.batch_size = 0  # Held-out tasks solved at once (bounds memory); 0: all eval.num_tasks at once.

    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 10  # Period of the metrics written to metrics.jsonl and printed.

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # Checkpoint period (and at the end); 0 saves only at the end.
    c.checkpoint.max_to_keep = 3  # Number of checkpoints kept.
    c.checkpoint.async_save = True  # Save in the background while training continues.
    # Also keep the checkpoint with the best held-out metric (e.g. "eval/adapted_mse"); "" keeps only the latest.
    # Every evaluated step is then checkpointed; `trainer.evaluate --step=best` picks the best one.
    c.checkpoint.best_metric = ""
    c.checkpoint.best_mode = "min"  # "min" or "max" (e.g. "max" for eval/adapted_acc).
    return c


def family_config(family: str) -> ml_collections.ConfigDict:
    """The default config with an imported task family ("module.path:ClassName") and its default options in
    tasks.options (so that `--config.tasks.options.<name>=...` can override them)."""
    c = default_config()
    c.tasks.family = family
    return validate(c)


def config_file_error(error: BaseException) -> ConfigError | None:
    """The ConfigError a config file's get_config raised (e.g. `configs/omniglot.py:ways=x`), found in the
    error absl's flag parsing reports (ml_collections re-raises it with its traceback as the message, absl
    wraps that again); None when the error did not come from one."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:  # The innermost one is get_config's own.
        seen.add(id(error))
        if isinstance(error, ConfigError):
            found = error
        error = error.__cause__ or error.__context__
    return found


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
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
    return None if ok else "a finite number > 0"


def _non_negative(value) -> str | None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
    return None if ok else "a finite number >= 0"


def _finite(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else "a finite number"


def _widths(value) -> str | None:
    ok = isinstance(value, (tuple, list)) and all(isinstance(w, int) and w > 0 for w in value)
    return None if ok else "a sequence of positive integers"


def _bool(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _str(value) -> str | None:
    return None if isinstance(value, str) else "a string (a path, or empty for the default)"


def _family(value) -> str | None:
    """A built-in name or "module.path:ClassName" (whether that imports is checked by `_validate_family`)."""
    ok = value in FAMILIES or (isinstance(value, str) and re.fullmatch(r"[\w.]+:[\w.]+", value) is not None)
    return None if ok else f"one of {list(FAMILIES)} or an import path 'module.path:ClassName'"


def _options(value) -> str | None:
    ok = isinstance(value, (ml_collections.ConfigDict, dict))
    return None if ok else "a group of fields (tasks.options.<name>) of an imported task family"


def _like(default) -> Callable[[Any], str | None]:
    """The rule of an imported family's field: a value of its default's kind (an int is a valid float)."""
    if isinstance(default, bool):
        return _bool
    if isinstance(default, int):
        return lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "an integer"
    if isinstance(default, float):
        return _finite
    if isinstance(default, str):
        return lambda v: None if isinstance(v, str) else "a string"
    if isinstance(default, (tuple, list)):
        return lambda v: None if isinstance(v, (tuple, list)) else "a sequence"
    return lambda v: None


RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": _int(0),
    "compile_cache_dir": lambda v: None if isinstance(v, str) else 'a path, "" or "none"',
    "model.hidden_sizes": _widths,
    "model.activation": _choice(ACTIVATIONS),
    "model.dtype": _choice(DTYPES),
    "model.conv_width": _int(1),
    "model.conv_blocks": _int(1),
    "model.conv_impl": _choice(CONV_IMPLEMENTATIONS),
    "model.normalization": _choice(NORMALIZATIONS),
    "tasks.family": _family,
    "tasks.options": _options,  # One field: its contents are the family's (`_validate_family`).
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
    "tasks.num_ways": _int(2),
    "tasks.data_dir": _str,
    "tasks.cache_dir": _str,
    "tasks.image_size": _int(4),
    "tasks.split": _choice(SPLITS),
    "tasks.split_seed": _int(0),
    "tasks.num_train_classes": _int(1),
    "tasks.num_test_classes": _int(0),
    "tasks.rotate": _bool,
    "inner.solver": _choice(INNER_SOLVERS),
    "inner.l2reg": _positive,
    "inner.maxiter": _int(1),
    "inner.tol": _positive,
    "inner.history_size": _int(1),
    "inner.linesearch": _choice(LINESEARCHES),
    "inner.maxls": _int(1),
    "inner.unrolled_stepsize": _positive,
    "inner.gd_stepsize": _positive,
    "meta_grad.estimator": _choice(ESTIMATORS),
    "meta_grad.linear_solver": _choice(LINEAR_SOLVERS),
    "meta_grad.solver_maxiter": _int(1),
    "meta_grad.solver_tol": _positive,
    "meta_grad.drop_tasks": _choice(DROP_POLICIES),
    "meta_grad.drop_residual_factor": _positive,
    "meta_grad.max_dropped_fraction": lambda v: (
        _non_negative(v) or (None if v <= 1 else "a number in [0, 1]")
    ),
    "meta_grad.max_dropped_steps": _int(1),
    "outer.optimizer": _choice(OPTIMIZERS),
    "outer.learning_rate": _positive,
    "outer.schedule": _choice(SCHEDULES),
    "outer.warmup_steps": _int(0),
    "outer.grad_clip_norm": _non_negative,
    "outer.weight_decay": _non_negative,
    "outer.adam_eps": _positive,
    "meta_grad.damping": _non_negative,
    "train.num_steps": _int(1),
    "train.meta_batch_size": _int(1),
    "parallel.backend": _choice(BACKENDS),
    "parallel.num_devices": _int(0),
    "parallel.task_mapping": _choice(TASK_MAPPINGS),
    "eval.every_steps": _int(0),
    "eval.num_tasks": _int(1),
    "eval.batch_size": _int(0),
    "logging.every_steps": _int(1),
    "checkpoint.every_steps": _int(0),
    "checkpoint.max_to_keep": _int(1),
    "checkpoint.async_save": _bool,
    "checkpoint.best_metric": lambda v: None if isinstance(v, str) else 'a held-out metric name, or ""',
    "checkpoint.best_mode": _choice(("min", "max")),
    "train.init_from": _str,
}


def flatten(
    config: ml_collections.ConfigDict | dict[str, Any], keep: tuple[str, ...] = (), prefix: str = ""
) -> dict[str, Any]:
    """{"group.field": value} of a config or of its `to_dict` / JSON form (the one flattening of the package);
    a group named in `keep` stays one value (e.g. "tasks.options" for validation)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)) and name not in keep:
            flat.update(flatten(value, keep, name + "."))
        else:
            flat[name] = value
    return flat


def update_from_dict(config: ml_collections.ConfigDict, saved: dict[str, Any], source: str) -> None:
    """Sets every field of `saved` (a `to_dict` / JSON form, `source` names it in errors) in `config`; JSON
    lists become the schema's tuples, and unknown fields are added (validate() reports them)."""
    for name, value in flatten(saved).items():
        *groups, key = name.split(".")
        node = config
        try:
            for group in groups:
                if group not in node:
                    node[group] = ml_collections.ConfigDict()
                node = node[group]
                if not isinstance(node, ml_collections.ConfigDict):
                    raise TypeError(f"{group!r} is a field, not a group")
            node[key] = tuple(value) if isinstance(value, list) else value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: field '{name}' = {value!r} does not fit the schema: {e}") from e


def from_saved(saved: dict[str, Any], source: str, check: bool = True) -> ml_collections.ConfigDict:
    """A saved config (config.json, a checkpoint's) completed by `default_config()`: a field it lacks, written
    before that field existed, has its default. Validated unless `check` is False; `source` names it."""
    config = default_config()
    update_from_dict(config, saved, source)
    if not check:
        return config
    try:
        return validate(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def _nearest_multiples(value: int, divisor: int) -> list[int]:
    below = (value // divisor) * divisor
    return sorted({m for m in (below, below + divisor) if m > 0})


def with_fields(config: ml_collections.ConfigDict, fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """A validated copy of `config` with the named fields ("inner.l2reg": 0.1, "seed": 3, ...) replaced."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for name, value in fields.items():
            group, _, field = name.rpartition(".")
            (config[group] if group else config)[field] = value
    return validate(config)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field against the schema; raises ConfigError naming the first bad field."""
    flat = flatten(config, keep=("tasks.options",))
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
    for low, high in (
        ("amplitude_min", "amplitude_max"),
        ("frequency_min", "frequency_max"),
        ("phase_min", "phase_max"),
        ("x_min", "x_max"),
    ):
        if flat[f"tasks.{low}"] > flat[f"tasks.{high}"]:
            raise ConfigError(
                f"config field 'tasks.{low}' = {flat[f'tasks.{low}']} must be <= "
                f"'tasks.{high}' = {flat[f'tasks.{high}']}"
            )
    fixed = flat["tasks.num_fixed_train_tasks"]
    if fixed and flat["train.meta_batch_size"] > fixed:
        raise ConfigError(
            f"config field 'train.meta_batch_size' = {flat['train.meta_batch_size']} exceeds "
            f"'tasks.num_fixed_train_tasks' = {fixed}: a step cannot use a task twice"
        )
    if flat["model.dtype"] == "float32" and flat["inner.tol"] < 1e-7:
        raise ConfigError(
            f"config field 'inner.tol' = {flat['inner.tol']} is unreachable in float32: "
            "expected >= 1e-7, or model.dtype = 'float64'"
        )
    if flat["tasks.family"] in FAMILIES and flat["tasks.options"]:
        raise ConfigError(
            f"config field 'tasks.options' = {dict(flat['tasks.options'])} is for imported task families; "
            f"tasks.family = {flat['tasks.family']!r} has none (its fields are the other tasks.* fields)"
        )
    _validate_family(config)
    return config


def _validate_family(config: ml_collections.ConfigDict) -> None:
    """The family of tasks.family (a built-in one, or imported now and checked: trainer/families.py), then its
    fields in tasks.options: none unknown, the missing ones filled in with its defaults, each of its default's
    kind, and the family's own `check_config(config)` (a ValueError names the bad field; a built-in family's
    ConfigError is its whole message, an imported one's is prefixed with tasks.family)."""
    # Imported here, not at the top: the families bring in JAX (and trainer.families imports this module),
    # which loading a config file and the CLI's flag parsing do not need.
    from trainer import families

    name = config.tasks.family
    family = families.family_class(name)
    defaults = dict(getattr(family, "default_options", {}))
    options = config.tasks.options
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {[f'tasks.options.{k}' for k in unknown]} of tasks.family = {name!r}; "
            f"its fields: {[f'tasks.options.{k}' for k in sorted(defaults)]}"
        )
    with config.unlocked():  # Resolved here, so that config.json and checkpoints record every value.
        for key, default in defaults.items():
            if key not in options:
                options[key] = copy.deepcopy(default)
    for key, default in defaults.items():
        expected = _like(default)(options[key])
        if expected is not None:
            raise ConfigError(
                f"config field 'tasks.options.{key}' = {options[key]!r} is invalid: expected {expected} "
                f"(the default of tasks.family = {name!r} is {default!r})"
            )
    check = getattr(family, "check_config", None)
    if check is not None and name in FAMILIES:
        check(config)  # Its ConfigError names the field in full (omniglot: what the data set allows).
    elif check is not None:
        try:
            check(config)
        except ValueError as e:
            raise ConfigError(f"tasks.family = {name!r}: {e}") from e


def check_device_count(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The meta-batch must split evenly over the task axis; fails before any compilation."""
    batch = config.train.meta_batch_size
    if batch % num_devices:
        raise ConfigError(
            f"config field 'train.meta_batch_size' = {batch} is not divisible by the {num_devices} devices on the "
            f"'tasks' axis; nearest valid sizes: {_nearest_multiples(batch, num_devices)} "
            "(or set parallel.num_devices)"
        )
    if config.tasks.num_fixed_train_tasks and config.tasks.num_fixed_train_tasks < batch:
        raise ConfigError("tasks.num_fixed_train_tasks must be >= train.meta_batch_size")


# Where the data come from does not change them (every source is checked to give the same arrays); when a
# run stops for dropped tasks is decided on the host and does not change any update.
_NOT_MATHS = (
    "tasks.data_dir",
    "tasks.cache_dir",
    "meta_grad.max_dropped_fraction",
    "meta_grad.max_dropped_steps",
)


def maths_fields(config: ml_collections.ConfigDict | None = None) -> tuple[str, ...]:
    """Fields whose change alters the optimisation problem (refused on resume unless overridden).

    "tasks.options" stands for all of an imported family's fields; given the config, they are also named
    one by one (tasks.options.<name>), as the flattened saved config has them. Under a decaying learning-rate
    schedule of the given config, train.num_steps (the schedule's length) is one of them.
    """
    groups = ("seed", "model", "tasks", "inner", "meta_grad", "outer")
    names = tuple(
        name
        for name in RULES
        if (name.split(".")[0] in groups or name == "train.meta_batch_size") and name not in _NOT_MATHS
    )
    if config is None:
        return names
    options = tuple(f"tasks.options.{k}" for k in sorted(config.tasks.options))
    schedule_length = ("train.num_steps",) if config.outer.schedule != "constant" else ()
    return names + options + schedule_length


def known_field(name: str) -> bool:
    """Whether `name` ("group.field") can be a config field: one of RULES, or an imported family's field
    tasks.options.<name> (which ones the family declares is checked by validate())."""
    return name in RULES or (name.startswith("tasks.options.") and len(name) > len("tasks.options."))


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serialisable dict of the resolved config."""

    def convert(value):
        if isinstance(value, ml_collections.ConfigDict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        return value

    return convert(config)
