"""Section 4: each meta-gradient estimator's relative error against the exact one, and its cost.

The exact meta-gradient of task i is  lambda (H + lambda I)^{-1} grad L_query(x*)  with H the dense Hessian of
the support loss at x*, x* solved tightly (settings.reference_tol) and a dense linear solve: the formula of
tests/test_meta_grad.py::_exact_implicit_grad. Every estimator is evaluated on the same tasks at the
benchmark's inner settings, so its error includes both its inner solve's and its linear solve's.
The tasks run one after another (lax.map) in every row.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bench import notebook_baseline
from bench.settings import Problem, Settings, make_config
from bench.timing import compile_timed, time_calls
from trainer import families
from trainer import inner_solver as inner_lib
from trainer import meta_grad as meta_grad_lib
from trainer import model as model_lib

LOOSE_KEY = "implicit_loose_inner_tol"  # The row of settings.loose_inner_tol (read by the report).
UNCAPPED_TOL = 1e-30  # A CG tolerance never reached: the solve runs exactly solver_maxiter iterations.


def exact_meta_grads(problem: Problem, settings: Settings, task_batch) -> tuple[np.ndarray, np.ndarray]:
    """Per-task exact meta-gradients, flattened [T, P], and the reference inner solves' residuals [T]."""
    config, model = problem.config, problem.model
    lam = config.inner.l2reg
    inner_problem = inner_lib.InnerProblem(
        loss=lambda params, data: model_lib.mse_loss(model, params, *data), l2reg=lam
    )
    solver = inner_lib.LBFGSSolver(
        maxiter=settings.reference_maxiter,
        tol=settings.reference_tol,
        history_size=config.inner.history_size,
        linesearch=config.inner.linesearch,
        maxls=config.inner.maxls,
    )

    def one_task(theta, task):
        support = families.support(task)
        x_star, stats = solver.solve(inner_problem, theta, theta, support)
        x_flat, unravel = ravel_pytree(x_star)
        hessian = jax.hessian(lambda v: inner_problem.loss(unravel(v), support))(x_flat)
        query_grad = jax.grad(lambda p: model_lib.mse_loss(model, p, *families.query(task)))(x_star)
        rhs = ravel_pytree(query_grad)[0]
        return lam * jnp.linalg.solve(
            hessian + lam * jnp.eye(x_flat.size, dtype=x_flat.dtype), rhs
        ), stats.residual

    exact = jax.jit(lambda theta, batch: jax.lax.map(lambda task: one_task(theta, task), batch))
    grads, residuals = exact(problem.meta_params, task_batch)
    return np.asarray(grads), np.asarray(residuals)


def flatten_per_task(grads_T) -> np.ndarray:
    return np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(grads_T))


def relative_errors(grads: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Per-task relative errors (median, max) and the relative error of the meta-batch mean."""
    per_task = np.linalg.norm(grads - exact, axis=1) / np.linalg.norm(exact, axis=1)
    mean_error = np.linalg.norm(grads.mean(0) - exact.mean(0)) / np.linalg.norm(exact.mean(0))
    return dict(
        rel_error_median=float(np.median(per_task)),
        rel_error_max=float(np.max(per_task)),
        rel_error_of_mean=float(mean_error),
    )


def variants(settings: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, description, config overrides) of the project's estimators measured."""
    rows = [("implicit_default", "implicit, CG to tol 1e-10 (<= 200 it; the project's default)", {})]
    if settings.loose_inner_tol:
        rows.append(
            (
                LOOSE_KEY,
                f"implicit, inner tol {settings.loose_inner_tol:g} (CG to tol 1e-10; throughput's loose row)",
                dict(inner__tol=settings.loose_inner_tol),
            )
        )
    rows += [
        (
            f"implicit_cg{k}",
            f"implicit, CG {k} iteration{'s' if k > 1 else ''}",
            dict(meta_grad__solver_maxiter=k, meta_grad__solver_tol=UNCAPPED_TOL),
        )
        for k in settings.cg_iterations
    ]
    rows += [
        ("first_order", "first_order (grad L_query(x*))", dict(meta_grad__estimator="first_order")),
        (
            "unrolled",
            f"unrolled (gradient descent, step {make_config(settings).inner.unrolled_stepsize:g}, {settings.inner_maxiter} it)",
            dict(meta_grad__estimator="unrolled"),
        ),
    ]
    return rows


def run(settings: Settings, log=print) -> dict[str, Any]:
    """Each estimator's error against the exact meta-gradient on settings.accuracy_tasks tasks; its time."""
    problem = Problem.create(make_config(settings))
    task_batch = problem.tasks(settings.accuracy_tasks)
    exact, residuals = exact_meta_grads(problem, settings, task_batch)
    log(f"  exact reference: {len(exact)} tasks, inner residual max {residuals.max():.1e}")
    theta = problem.meta_params
    rows = []
    for key, description, overrides in variants(settings):
        # Tasks one after another (lax.map): the vmapped program compiles slower, and here each
        # task's cost should not depend on the slowest task of the batch.
        config = make_config(settings, parallel__task_mapping="map", **overrides)
        task_meta_grad = meta_grad_lib.make_task_meta_grad(config, problem.model, families.get_family(config))
        batch_grads = jax.jit(lambda t, b, f=task_meta_grad: meta_grad_lib.batch_meta_grad(f, t, b, "map"))
        rows.append(_measure(key, description, batch_grads, theta, task_batch, exact, settings, log))
    # The notebook's formulation, one task at a time as its loop does (lax.map: one L-BFGS in the program).
    notebook_grad = notebook_baseline.make_task_meta_grad(
        problem.model, settings.l2reg, settings.inner_maxiter, settings.inner_tol, settings.linesearch
    )

    def notebook(theta, batch):
        grads, iterations = jax.lax.map(lambda task: notebook_grad(theta, task), batch)
        return grads, dict(inner_iterations=iterations)

    rows.append(
        _measure(
            "notebook",
            "notebook: jaxopt default implicit solve (normal CG, tol 1e-5), tasks one after another",
            jax.jit(notebook),
            theta,
            task_batch,
            exact,
            settings,
            log,
        )
    )
    return dict(
        num_tasks=settings.accuracy_tasks,
        reference_residual_max=float(residuals.max()),
        reference_tol=settings.reference_tol,
        rows=rows,
    )


def _measure(key, description, fn, theta, task_batch, exact, settings, log) -> dict[str, Any]:
    compiled, compile_s = compile_timed(fn, theta, task_batch)
    timing, (grads_T, metrics) = time_calls(
        compiled, lambda: (theta, task_batch), reps=settings.reps, budget_s=settings.budget_s
    )
    errors = relative_errors(flatten_per_task(grads_T), exact)
    row = dict(key=key, estimator=description, compile_s=compile_s, time_s=timing.to_json(), **errors)
    row["inner_iterations_mean"] = float(np.mean(metrics["inner_iterations"]))
    if "inner_converged" in metrics:  # The project's own check: residual of the optimality condition <= tol.
        row["inner_converged"] = int(np.sum(metrics["inner_converged"]))
        row["inner_residual_max"] = float(np.max(metrics["inner_residual"]))
    log(
        f"  {key}: rel. error {errors['rel_error_of_mean']:.2e}, {timing.median:.3f} s, "
        f"compile {compile_s:.1f} s"
    )
    return row
