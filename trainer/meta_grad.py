"""Per-task meta-gradients of the query loss at the inner solution, behind one interface.

For one task: meta_loss(theta) = L_query(x*(theta)). Estimators of d meta_loss / d theta:
  implicit     lambda (H + lambda I)^{-1} grad L_query(x*), by implicit differentiation of the inner
               optimality condition (the linear solve from config: CG by default, tight tolerance);
  unrolled     reverse mode through every iteration of an unrolled gradient-descent inner solve;
  first_order  grad L_query(x*), ignoring how x* depends on theta.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from trainer import families
from trainer import inner_solver as inner_lib
from trainer import mapping as mapping_lib

Params = Any
TaskMetaGrad = Callable[[Params, families.TaskBatch], tuple[Params, dict[str, jax.Array]]]


def make_task_meta_grad(config: ml_collections.ConfigDict, model, family) -> TaskMetaGrad:
    """(meta_params, one task) -> (meta-gradient, per-task metrics); `batch_meta_grad` maps it over tasks.

    The loss is the family's; its extra per-task metrics (e.g. accuracy) are reported on the query and support
    sets as query_<name> and support_<name>.
    """
    problem, solver = inner_lib.from_config(config, functools.partial(family.loss, model))
    first_order = config.meta_grad.estimator == "first_order"

    def meta_loss(meta_params, task):
        support, query = families.support(task), families.query(task)
        inner_params, stats = solver.solve(problem, meta_params, meta_params, support)
        query_loss = family.loss(model, inner_params, *query)
        return query_loss, (inner_params, stats)

    def task_meta_grad(meta_params, task):
        if first_order:
            query_loss, (inner_params, stats) = meta_loss(meta_params, task)
            grad = jax.grad(lambda x: family.loss(model, x, *families.query(task)))(inner_params)
        else:
            (query_loss, (inner_params, stats)), grad = jax.value_and_grad(meta_loss, has_aux=True)(
                meta_params, task
            )
        metrics = dict(
            query_loss=query_loss,
            support_loss=family.loss(model, inner_params, *families.support(task)),
            inner_iterations=stats.iterations.astype(jnp.float32),
            inner_residual=stats.residual,
            inner_converged=stats.converged.astype(jnp.float32),
            inner_linesearch_failures=stats.linesearch_failures.astype(jnp.float32),
            inner_evaluations=stats.evaluations.astype(jnp.float32),
        )
        for split, (x, y) in (("query", families.query(task)), ("support", families.support(task))):
            for name, value in family.task_metrics(model, inner_params, x, y).items():
                metrics[f"{split}_{name}"] = value
        return grad, metrics

    return task_meta_grad


def batch_meta_grad(
    task_meta_grad: TaskMetaGrad, meta_params: Params, task_batch, task_mapping: str
) -> tuple[Params, dict]:
    """Over the leading task axis (`mapping.map_tasks` with "vmap" or "map"): grads [T, ...], metrics [T]."""
    return mapping_lib.map_tasks(lambda task: task_meta_grad(meta_params, task), task_mapping, task_batch)
