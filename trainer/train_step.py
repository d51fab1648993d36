"""The train state and the pure meta-step `train_step(state, task_batch) -> (state, metrics)`.

Inside one device (or the only one) the step maps the per-task meta-gradient over its local tasks and
averages them; with `axis_name` set (under `shard_map` or `pmap`) the local means are all-reduced with
`lax.pmean`, so every device applies the same optax update to its replica of the meta-parameters.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
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


# Per-task metrics of `meta_grad.make_task_meta_grad` reduced by name below; any others are averaged.
_PER_TASK_REDUCED = frozenset(
    {"query_loss", "support_loss", "inner_iterations", "inner_residual", "inner_converged"}
)


def _all_reduce(metric: jax.Array, op: str, axis_name: str | None) -> jax.Array:
    local = {"mean": jnp.mean, "max": jnp.max, "sum": jnp.sum}[op](metric)
    if axis_name is None:
        return local
    return {"mean": jax.lax.pmean, "max": jax.lax.pmax, "sum": jax.lax.psum}[op](local, axis_name)


def train_step(
    state: TrainState,
    task_batch,
    *,
    task_meta_grad: meta_grad_lib.TaskMetaGrad,
    optimizer: optax.GradientTransformation,
    axis_name: str | None = None,
):
    """One meta-update from the tasks in `task_batch` (this device's slice when `axis_name` is set).

    Every device holds the same number of tasks (checked at config time), so the mean of the per-device
    means is the mean over the whole meta-batch.
    """
    grads_T, per_task = meta_grad_lib.batch_meta_grad(task_meta_grad, state.meta_params, task_batch)
    grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads_T)
    if axis_name is not None:
        grad = jax.lax.pmean(grad, axis_name)
    updates, opt_state = optimizer.update(grad, state.opt_state, state.meta_params)
    meta_params = optax.apply_updates(state.meta_params, updates)

    local_max_iterations = jnp.max(per_task["inner_iterations"])
    metrics = dict(
        query_loss=_all_reduce(per_task["query_loss"], "mean", axis_name),
        support_loss=_all_reduce(per_task["support_loss"], "mean", axis_name),
        inner_iterations_mean=_all_reduce(per_task["inner_iterations"], "mean", axis_name),
        inner_iterations_max=_all_reduce(per_task["inner_iterations"], "max", axis_name),
        inner_residual_mean=_all_reduce(per_task["inner_residual"], "mean", axis_name),
        inner_residual_max=_all_reduce(per_task["inner_residual"], "max", axis_name),
        inner_converged_fraction=_all_reduce(per_task["inner_converged"], "mean", axis_name),
        inner_nonconverged_tasks=_all_reduce(1.0 - per_task["inner_converged"], "sum", axis_name),
        # Tasks whose inner solution or query loss is NaN/inf: named when a NaN stops the run.
        inner_diverged_tasks=_all_reduce(
            1.0
            - (jnp.isfinite(per_task["inner_residual"]) & jnp.isfinite(per_task["query_loss"])).astype(
                jnp.float32
            ),
            "sum",
            axis_name,
        ),
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
    # A family's extra per-task metrics (query_accuracy, support_accuracy for classification): means.
    for name in sorted(set(per_task) - _PER_TASK_REDUCED):
        metrics[name] = _all_reduce(per_task[name], "mean", axis_name)
    new_state = state.replace(step=state.step + 1, meta_params=meta_params, opt_state=opt_state)
    return new_state, metrics
