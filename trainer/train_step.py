"""The train state and the pure meta-step `train_step(state, task_batch) -> (state, metrics)`.

Inside one device (or the only one) the step maps the per-task meta-gradient over its local tasks, leaves
out the tasks whose inner solve is unusable (`TaskFilter`) and sums the others; with `axis_name` set (under
`shard_map` or `pmap`) the sums and the kept counts are all-reduced with `lax.psum`, so every device applies
the same optax update (the mean over the kept tasks) to its replica of the meta-parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from trainer import inner_solver as inner_lib
from trainer import meta_grad as meta_grad_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of meta-updates applied so far.
    meta_params: Any  # theta, the meta-learned initialisation / proximal centre.
    opt_state: Any  # optax state of the outer optimizer.
    task_key: jax.Array  # raw uint32 key data; step s draws its tasks from fold_in(task_key, s).


def create_train_state(
    meta_params, optimizer: optax.GradientTransformation, task_key: jax.Array
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        meta_params=meta_params,
        opt_state=optimizer.init(meta_params),
        task_key=jnp.asarray(task_key, jnp.uint32),
    )


@dataclasses.dataclass(frozen=True)
class TaskFilter:
    """Which tasks' meta-gradients enter a step's mean (`meta_grad.drop_tasks`, config.py).

    "unusable": the task's meta-gradient, losses and inner residual are finite and the residual is at most
    `max_residual`; "nonfinite": they are finite; "none": every task.
    """

    policy: str
    max_residual: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> TaskFilter:
        mg = config.meta_grad
        return cls(policy=mg.drop_tasks, max_residual=mg.drop_residual_factor * config.inner.tol)

    def __call__(self, grads_T, per_task: dict[str, jax.Array]) -> jax.Array:
        """bool [T]: the tasks kept."""
        num_tasks = per_task["query_loss"].shape[0]
        if self.policy == "none":
            return jnp.ones((num_tasks,), bool)
        finite = jnp.isfinite(per_task["query_loss"]) & jnp.isfinite(per_task["support_loss"])
        finite &= jnp.isfinite(per_task["inner_residual"])
        for g in jax.tree.leaves(grads_T):
            finite &= jnp.all(jnp.isfinite(g.reshape(num_tasks, -1)), axis=1)
        if self.policy == "nonfinite":
            return finite
        return finite & (per_task["inner_residual"] <= self.max_residual)


# Per-task metrics of `meta_grad.make_task_meta_grad` reduced by name below; the others (a family's, e.g.
# accuracy) are averaged over the kept tasks.
_PER_TASK_REDUCED = frozenset(
    {
        "query_loss",
        "support_loss",
        "inner_iterations",
        "inner_residual",
        "inner_converged",
        "inner_linesearch_failures",
        "inner_evaluations",
    }
)


def _all_reduce(metric: jax.Array, op: str, axis_name: str | None) -> jax.Array:
    local = {"mean": jnp.mean, "max": jnp.max, "sum": jnp.sum}[op](metric)
    if axis_name is None:
        return local
    return {"mean": jax.lax.pmean, "max": jax.lax.pmax, "sum": jax.lax.psum}[op](local, axis_name)


def _kept_mean(values_T: jax.Array, keep_T: jax.Array, num_kept: jax.Array, axis_name: str | None):
    """Mean over the kept tasks of the whole meta-batch: psum of the kept values over psum of their count."""
    keep = keep_T.reshape(keep_T.shape + (1,) * (values_T.ndim - 1))
    local = jnp.sum(jnp.where(keep, values_T, jnp.zeros_like(values_T)), axis=0)
    total = local if axis_name is None else jax.lax.psum(local, axis_name)
    return total / jnp.maximum(num_kept, 1).astype(values_T.dtype)


def train_step(
    state: TrainState,
    task_batch,
    *,
    task_meta_grad: meta_grad_lib.TaskMetaGrad,
    task_mapping: str,
    optimizer: optax.GradientTransformation,
    task_filter: TaskFilter,
    axis_name: str | None = None,
):
    """One meta-update from the tasks in `task_batch` (this device's slice when `axis_name` is set).

    The meta-gradient is the mean of the kept tasks' meta-gradients over the whole meta-batch (`task_filter`
    decides which are kept; the sums and the count are all-reduced separately, so devices may keep different
    numbers of tasks). A step that keeps no task leaves the meta-parameters and optimizer state unchanged.
    `task_mapping` ("vmap" or "map", `mapping.task_mapping`) maps `task_meta_grad` over the local tasks.
    """
    grads_T, per_task = meta_grad_lib.batch_meta_grad(
        task_meta_grad, state.meta_params, task_batch, task_mapping
    )
    keep_T = task_filter(grads_T, per_task)
    num_kept = _all_reduce(keep_T.astype(jnp.int32), "sum", axis_name)
    grad = jax.tree.map(lambda g: _kept_mean(g, keep_T, num_kept, axis_name), grads_T)
    updates, opt_state = optimizer.update(grad, state.opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)
    applied = num_kept > 0
    meta_params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(applied, new, old),
        (meta_params, opt_state),
        (state.meta_params, state.opt_state),
    )
    updates = jax.tree.map(lambda u: jnp.where(applied, u, jnp.zeros_like(u)), updates)

    local_max_iterations = jnp.max(per_task["inner_iterations"])
    finite = jnp.isfinite(per_task["inner_residual"]) & jnp.isfinite(per_task["query_loss"])
    count = lambda flags: _all_reduce(flags.astype(jnp.float32), "sum", axis_name)
    metrics = dict(
        query_loss=_kept_mean(per_task["query_loss"], keep_T, num_kept, axis_name),
        support_loss=_kept_mean(per_task["support_loss"], keep_T, num_kept, axis_name),
        inner_iterations_mean=_all_reduce(per_task["inner_iterations"], "mean", axis_name),
        inner_iterations_max=_all_reduce(per_task["inner_iterations"], "max", axis_name),
        inner_evaluations_mean=_all_reduce(per_task["inner_evaluations"], "mean", axis_name),
        inner_residual_mean=_all_reduce(per_task["inner_residual"], "mean", axis_name),
        inner_residual_max=_all_reduce(per_task["inner_residual"], "max", axis_name),
        inner_converged_fraction=_all_reduce(per_task["inner_converged"], "mean", axis_name),
        inner_nonconverged_tasks=count(per_task["inner_converged"] == 0),
        # Tasks whose inner solution or query loss is NaN/inf.
        inner_diverged_tasks=count(~finite),
        inner_linesearch_failed_tasks=count(per_task["inner_linesearch_failures"] > 0),
        # Tasks left out of the meta-gradient mean (meta_grad.drop_tasks).
        inner_dropped_tasks=count(~keep_T),
        grad_norm=inner_lib.tree_norm(grad),
        param_norm=inner_lib.tree_norm(meta_params),
        update_norm=inner_lib.tree_norm(updates),
        # Per-device max inner iterations: each device's while_loop stops with its own slowest task.
        inner_iterations_max_per_device=(
            local_max_iterations[None]
            if axis_name is None
            else jax.lax.all_gather(local_max_iterations, axis_name)
        ),
    )
    # A family's extra per-task metrics (query_accuracy, support_accuracy for classification).
    for name in sorted(set(per_task) - _PER_TASK_REDUCED):
        metrics[name] = _kept_mean(per_task[name], keep_T, num_kept, axis_name)
    new_state = state.replace(step=state.step + 1, meta_params=meta_params, opt_state=opt_state)
    return new_state, metrics


def make_train_step(
    config: ml_collections.ConfigDict,
    model,
    family,
    optimizer: optax.GradientTransformation,
    task_mapping: str,
):
    """`train_step` with every dependency bound (the one place the step is assembled):
    (state, task_batch, axis_name=None) -> (state, metrics). `parallel` distributes it."""
    return functools.partial(
        train_step,
        task_meta_grad=meta_grad_lib.make_task_meta_grad(config, model, family),
        task_mapping=task_mapping,
        optimizer=optimizer,
        task_filter=TaskFilter.from_config(config),
    )
