"""Per-task meta-gradients of the query loss at the inner solution, behind one interface.

For one task: meta_loss(theta) = L_query(x*(theta)). Estimators of d meta_loss / d theta:
  implicit     lambda (H + lambda I)^{-1} grad L_query(x*), by implicit differentiation of the inner
               optimality condition (the linear solve from config: CG by default, tight tolerance);
  unrolled     reverse mode through every iteration of an unrolled gradient-descent inner solve;
  first_order  grad L_query(x*), ignoring how x* depends on theta.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from trainer import families as families_lib
from trainer import inner_solver as inner_lib
from trainer import model as model_lib
from trainer import tasks as tasks_lib

Params = Any
TaskMetaGrad = Callable[[Params, tasks_lib.TaskBatch], tuple[Params, dict[str, jax.Array]]]


def support_loss_fn(model, loss=model_lib.mse_loss) -> Callable[[Params, Any], jax.Array]:
    """(params, (x, y)) -> the per-task `loss(model, params, x, y)` (a family's loss; MSE by default)."""
    return lambda params, data: loss(model, params, *data)


def make_inner_solver(
    config: ml_collections.ConfigDict, differentiable: bool = True
) -> inner_lib.InnerSolver:
    """The inner solver for `meta_grad.estimator`; `differentiable=False` gives a solve with no gradient."""
    inner, mg = config.inner, config.meta_grad
    if differentiable and mg.estimator == "unrolled":
        return inner_lib.UnrolledGradientDescent(
            maxiter=inner.maxiter, tol=inner.tol, stepsize=inner.unrolled_stepsize
        )
    linear_solve = None
    if differentiable and mg.estimator == "implicit":
        linear_solve = inner_lib.make_linear_solve(
            mg.linear_solver, mg.solver_tol, mg.solver_maxiter, mg.damping
        )
    if inner.solver == "gd":
        return inner_lib.GradientDescentSolver(
            maxiter=inner.maxiter, tol=inner.tol, stepsize=inner.gd_stepsize, linear_solve=linear_solve
        )
    return inner_lib.LBFGSSolver(
        maxiter=inner.maxiter,
        tol=inner.tol,
        history_size=inner.history_size,
        linesearch=inner.linesearch,
        maxls=inner.maxls,
        linear_solve=linear_solve,
    )


def make_task_meta_grad(config: ml_collections.ConfigDict, model, family=None) -> TaskMetaGrad:
    """(meta_params, one task) -> (meta-gradient, per-task metrics). vmap it over tasks.

    The loss is the family's (`families.get_family(config)` unless given); its extra per-task metrics
    (e.g. accuracy) are reported on the query and support sets as query_<name> and support_<name>.
    """
    family = family or families_lib.get_family(config)
    problem = inner_lib.InnerProblem(loss=support_loss_fn(model, family.loss), l2reg=config.inner.l2reg)
    solver = make_inner_solver(config)
    first_order = config.meta_grad.estimator == "first_order"

    def meta_loss(meta_params, task):
        support, query = tasks_lib.support(task), tasks_lib.query(task)
        inner_params, stats = solver.solve(problem, meta_params, meta_params, support)
        query_loss = family.loss(model, inner_params, *query)
        return query_loss, (inner_params, stats)

    def task_meta_grad(meta_params, task):
        if first_order:
            query_loss, (inner_params, stats) = meta_loss(meta_params, task)
            grad = jax.grad(lambda x: family.loss(model, x, *tasks_lib.query(task)))(inner_params)
        else:
            (query_loss, (inner_params, stats)), grad = jax.value_and_grad(meta_loss, has_aux=True)(
                meta_params, task
            )
        metrics = dict(
            query_loss=query_loss,
            support_loss=family.loss(model, inner_params, *tasks_lib.support(task)),
            inner_iterations=stats.iterations.astype(jnp.float32),
            inner_residual=stats.residual,
            inner_converged=stats.converged.astype(jnp.float32),
            inner_linesearch_failures=stats.linesearch_failures.astype(jnp.float32),
            inner_evaluations=stats.evaluations.astype(jnp.float32),
        )
        for split, (x, y) in (("query", tasks_lib.query(task)), ("support", tasks_lib.support(task))):
            for name, value in family.task_metrics(model, inner_params, x, y).items():
                metrics[f"{split}_{name}"] = value
        return grad, metrics

    task_meta_grad.vmap_tasks = vmap_tasks(config)  # Read by batch_meta_grad.
    return task_meta_grad


def vmap_tasks(config: ml_collections.ConfigDict) -> bool:
    """Whether a device's tasks are vmapped (parallel.task_mapping; "auto": not on CPU, where lax.map is faster)."""
    mapping = config.parallel.task_mapping
    if mapping == "auto":
        return jax.default_backend() != "cpu"
    return mapping == "vmap"


def map_tasks(fn: Callable, vmap_tasks: bool, *batched) -> Any:
    """fn over the leading task axis of `batched`: vmapped, or one task after another with lax.map."""
    if vmap_tasks:
        return jax.vmap(fn)(*batched)
    return jax.lax.map(lambda args: fn(*args), batched)


def batch_meta_grad(task_meta_grad: TaskMetaGrad, meta_params: Params, task_batch) -> tuple[Params, dict]:
    """Over the leading task axis (vmapped or lax.map, by parallel.task_mapping): grads [T, ...], metrics [T]."""
    vmap_tasks = getattr(task_meta_grad, "vmap_tasks", True)
    return map_tasks(lambda task: task_meta_grad(meta_params, task), vmap_tasks, task_batch)
