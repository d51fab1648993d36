"""The reference notebook's meta-step, re-implemented as the baseline of the benchmark (not in the package).

jaxopt's iMAML notebook (shared/reference/imaml_sinusoid_notebook.md) computes the outer loss with a Python
loop over tasks inside the jitted function: one `jaxopt.LBFGS(inner_loss, maxiter, tol).run(...)` per task,
one after another, each differentiated by jaxopt's default `implicit_diff_solve` (normal-equation CG at
tol 1e-5). The traced program holds one L-BFGS per task, so its compile time grows with the number of tasks.

Kept from the notebook: its inner loss (MSE + (lambda/2)||x - theta||^2 with jaxopt.tree_util), L-BFGS with
jaxopt's defaults apart from maxiter and tol, the default implicit-differentiation solve, an Adam update.
Changed so that both formulations solve the same problem on the same tasks: the model, lambda, maxiter,
tol (and, in --quick mode only, the line search) are the benchmark's; the inner solve starts from theta (the
notebook warm-starts from the previous step's solutions of its fixed tasks, and fresh tasks have none); the
outer loss is the mean over tasks, not the sum; each task is scored on its own query set (the notebook scored
every task on the last task's test set).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jaxopt import LBFGS, tree_util

import trainer  # noqa: F401  (before jaxopt: trainer/__init__.py filters its import warning)


def make_outer_loss(model, l2reg: float, maxiter: int, tol: float, linesearch: str = "zoom"):
    """(meta_params, task_batch) -> (mean query loss, inner iterations per task); the notebook's loss."""

    def inner_loss(x, outer_params, data):
        samples, targets = data
        mse = jnp.mean((model.apply(x, samples) - targets) ** 2)
        x_m_outer_parameters = tree_util.tree_add_scalar_mul(x, -1, outer_params)
        return mse + (l2reg / 2) * tree_util.tree_l2_norm(x_m_outer_parameters, squared=True)

    def outer_loss(outer_params, task_batch):
        num_tasks = task_batch["support_x"].shape[0]
        loss = 0.0
        iterations = []
        for i in range(num_tasks):  # The notebook's loop: one L-BFGS per task, traced one after another.
            data_train = (task_batch["support_x"][i], task_batch["support_y"][i])
            lbfgs = LBFGS(inner_loss, maxiter=maxiter, tol=tol, linesearch=linesearch)
            solution, state = lbfgs.run(jax.lax.stop_gradient(outer_params), outer_params, data_train)
            prediction = model.apply(solution, task_batch["query_x"][i])
            loss += jnp.mean((prediction - task_batch["query_y"][i]) ** 2)
            iterations.append(state.iter_num)
        return loss / num_tasks, jnp.stack(iterations)

    return outer_loss


def make_step(
    model,
    l2reg: float,
    maxiter: int,
    tol: float,
    optimizer: optax.GradientTransformation,
    linesearch: str = "zoom",
):
    """The jitted step (meta_params, opt_state, task_batch) -> (meta_params, opt_state, outputs).

    `outputs` holds the query loss, the inner iterations per task and the meta-gradient (for its accuracy).
    """
    outer_loss = make_outer_loss(model, l2reg, maxiter, tol, linesearch)

    def step(meta_params, opt_state, task_batch):
        (loss, iterations), grad = jax.value_and_grad(outer_loss, has_aux=True)(meta_params, task_batch)
        updates, opt_state = optimizer.update(grad, opt_state, meta_params)
        outputs = dict(query_loss=loss, inner_iterations=iterations, grad=grad)
        return optax.apply_updates(meta_params, updates), opt_state, outputs

    return jax.jit(step)


def make_task_meta_grad(model, l2reg: float, maxiter: int, tol: float, linesearch: str = "zoom"):
    """(meta_params, one task) -> (its meta-gradient in this formulation, its inner iterations).

    The loop's body for one task.
    """
    outer_loss = make_outer_loss(model, l2reg, maxiter, tol, linesearch)

    def task_meta_grad(meta_params, task):
        one_task_batch = jax.tree.map(lambda a: a[None], task)
        grad, iterations = jax.grad(lambda p: outer_loss(p, one_task_batch), has_aux=True)(meta_params)
        return grad, iterations[0]

    return task_meta_grad
