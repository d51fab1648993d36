"""What the benchmark measures, in its default and --quick sizes, and the shared problem set-up."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainer import config as config_lib
from trainer import families, mapping, optim, parallel
from trainer import model as model_lib
from trainer import train_step as train_step_lib


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of every section. The inner problem is configs/sinusoid_notebook.py's unless overridden here."""

    hidden_sizes: tuple[int, ...] = (20, 20, 20)  # The notebook's MLP [20, 20, 20, 1].
    l2reg: float = 1.0
    inner_maxiter: int = 500
    inner_tol: float = 1e-8
    linesearch: str = "zoom"  # L-BFGS line search of both formulations (jaxopt's default: zoom).
    task_mapping: str = "auto"  # parallel.task_mapping of sections 2 and 5 (auto: lax.map on CPU, vmap else).
    reps: int = 5  # Timed repetitions after one warm-up call.
    # Rounds of section 1's compile-time measurement (every meta-batch size once per round).
    compile_repeats: int = 3
    budget_s: float = 10.0  # Stop repeating a measurement after this many timed seconds (>= 2 repetitions).
    # 1. Throughput against the notebook's formulation.
    task_counts: tuple[int, ...] = (4, 32, 256)
    task_mappings: tuple[str, ...] = ("map", "vmap")  # The project's variants on one device (task_mapping).
    # The project also at this looser inner tolerance (tasks mapped): section 4 gives its meta-gradient error,
    # which must stay no worse than the notebook formulation's for the comparison to hold (0: no such row).
    loose_inner_tol: float = 1e-4
    # The project's step sharded over every device of the machine (CPU: one simulated device per usable core).
    all_devices: bool = True
    # On CPU, also shard over this many simulated devices per usable core (1: no such row): more devices than
    # cores split the tasks, whose inner solves differ in cost, into smaller pieces that the OS balances.
    devices_per_core: int = 4
    # The notebook loop's compile time grows ~7 s per task: it is compiled for at most this many tasks, and a
    # larger meta-batch runs that program on consecutive chunks (the loop's cost is a sum over tasks).
    baseline_max_tasks: int = 32
    # 2. Scaling over devices at a fixed meta-batch.
    scaling_devices: tuple[int, ...] = (1, 2, 4, 8)
    scaling_batch: int = 32
    # 3. Memory against inner iterations.
    memory_maxiters: tuple[int, ...] = (10, 50, 200, 1000)
    # 4. Estimators' accuracy against the dense-Hessian meta-gradient, and their cost.
    accuracy_tasks: int = 8
    cg_iterations: tuple[int, ...] = (1, 5, 20, 100)
    reference_maxiter: int = 5000  # The exact reference's inner solve: tight, so x* itself is exact.
    reference_tol: float = 1e-12


DEFAULT = Settings()
# A smoke check of every code path with as few compilations as possible (each costs 5-20 s on 2 cores).
QUICK = Settings(
    hidden_sizes=(8, 8),
    inner_maxiter=30,
    inner_tol=1e-6,
    linesearch="backtracking",  # With lax.map: compiles faster than vmapped zoom.
    task_mapping="map",
    reps=2,
    compile_repeats=1,
    loose_inner_tol=1e-2,  # Reached within its 30 iterations, unlike inner_tol.
    budget_s=2.0,
    task_counts=(2, 4),
    task_mappings=("map",),
    devices_per_core=1,
    baseline_max_tasks=2,
    scaling_devices=(1, 2),
    scaling_batch=2,
    memory_maxiters=(5, 20),
    accuracy_tasks=2,
    cg_iterations=(1,),
    reference_maxiter=2000,
    reference_tol=1e-10,
)


def make_config(settings: Settings, **overrides: Any) -> ml_collections.ConfigDict:
    """configs/sinusoid_notebook.py (trainer/config.py's defaults) with the benchmark's model and inner
    problem, on one device unless overridden.

    `overrides` are dotted field names with `__` for the dot, e.g. `train__meta_batch_size=16`.
    """
    c = config_lib.default_config()
    c.model.hidden_sizes = tuple(settings.hidden_sizes)
    c.inner.l2reg = settings.l2reg
    c.inner.maxiter = settings.inner_maxiter
    c.inner.tol = settings.inner_tol
    c.inner.linesearch = settings.linesearch
    c.parallel.task_mapping = settings.task_mapping
    c.parallel.backend = "none"
    return config_lib.with_fields(c, {name.replace("__", "."): value for name, value in overrides.items()})


@dataclasses.dataclass
class Problem:
    """The model, initial meta-parameters, optimizer and task keys every section starts from."""

    config: ml_collections.ConfigDict
    model: Any
    meta_params: Any
    optimizer: Any
    task_key: jax.Array
    dtype: Any

    @classmethod
    def create(cls, config: ml_collections.ConfigDict) -> Problem:
        model = model_lib.make_model(config)
        keys = families.split_keys(config.seed)
        optimizer, _ = optim.make_optimizer(config)
        return cls(
            config,
            model,
            model_lib.init_params(model, keys["init"]),
            optimizer,
            keys["train"],
            model_lib.dtype_of(config),
        )

    def host_state(self) -> train_step_lib.TrainState:
        return jax.tree.map(
            np.asarray, train_step_lib.create_train_state(self.meta_params, self.optimizer, self.task_key)
        )

    def tasks(self, num_tasks: int) -> families.TaskBatch:
        """Tasks 0..num_tasks-1 of step 0: every section and formulation sees the same ones."""
        return families.Sinusoid(self.config).sample(
            None, self.task_key, 0, jnp.arange(num_tasks), self.dtype
        )


def make_backend(config: ml_collections.ConfigDict, problem: Problem):
    """`parallel.make_backend` for the config, with the train step bound as train.py binds it."""
    family = families.get_family(config)
    local_step = train_step_lib.make_train_step(
        config, problem.model, family, problem.optimizer, mapping.task_mapping(config)
    )
    return parallel.make_backend(config, local_step, family, family.load_data(config).train)


def num_params(params: Any) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
