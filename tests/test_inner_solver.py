"""Inner solvers: the safeguarded L-BFGS never returns a point worse than its start (on a task that makes
jaxopt's plain L-BFGS fail), and iMAML-GD's implicit meta-gradient matches a dense Hessian solve."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tests import helpers
from trainer import families
from trainer import inner_solver as inner_lib
from trainer import meta_grad as meta_grad_lib
from trainer import model as model_lib

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import jaxopt

# Task 2 of update 490 of the default sinusoid run of main 9002c78 (lambda 1, L-BFGS 500 iterations at tol
# 1e-8), written by `python -m bench.failed_solve --workdir=RUN --step=489 --save=...`.
FAILED_TASK = os.path.join(os.path.dirname(__file__), "data", "failed_lbfgs_task.npz")


def _failed_task_problem():
    saved = np.load(FAILED_TASK)
    config = helpers.small_config(
        **{
            "model.hidden_sizes": tuple(int(w) for w in saved["hidden_sizes"]),
            "model.activation": str(saved["activation"]),
            **{
                f"inner.{k}": saved[f"inner_{k}"].item()
                for k in ("l2reg", "maxiter", "tol", "history_size", "maxls")
            },
        }
    )
    model = model_lib.make_model(config)
    template = model_lib.init_params(model, families.split_keys(0)["init"])
    theta = ravel_pytree(template)[1](jnp.asarray(saved["theta"]))
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=config.inner.l2reg)
    return config, problem, theta, (jnp.asarray(saved["support_x"]), jnp.asarray(saved["support_y"]))


def _plain_lbfgs(flat_objective, inner):
    """jaxopt's own L-BFGS with the config's settings: the reference the safeguarded solver is held against."""
    return jaxopt.LBFGS(
        fun=flat_objective,
        maxiter=inner.maxiter,
        tol=inner.tol,
        history_size=inner.history_size,
        maxls=inner.maxls,
        implicit_diff=False,
    )


def test_safeguarded_lbfgs_on_the_task_that_made_plain_lbfgs_fail():
    config, problem, theta, support = _failed_task_problem()
    inner = config.inner
    flat_objective, theta_flat, _ = inner_lib.flat_problem(problem, theta)
    plain = _plain_lbfgs(flat_objective, inner)
    start = float(problem.objective(theta, theta, support))
    x_plain, state = jax.jit(plain.run)(theta_flat, theta_flat, support)
    plain_objective = float(flat_objective(x_plain, theta_flat, support))
    # The failure this fixture records: all iterations used, and far worse than the start.
    assert int(state.iter_num) == inner.maxiter and plain_objective > 100 * start

    solver = inner_lib.make_solver(config, differentiable=False)
    x, stats = jax.jit(lambda t, d: solver.solve(problem, t, t, d))(theta, support)
    assert float(problem.objective(x, theta, support)) <= start
    assert int(stats.linesearch_failures) >= 1  # The restarts are what rescued it.
    assert bool(stats.converged), stats


@pytest.mark.parametrize("maxls", [1, 15])
def test_safeguarded_lbfgs_never_ends_above_its_start(maxls):
    """Large-amplitude tasks, a starved line search (maxls 1 fails on nearly every iteration), vmapped."""
    config = helpers.small_config(
        **{
            "inner.maxiter": 100,
            "inner.tol": 1e-10,
            "inner.maxls": maxls,
            "tasks.amplitude_max": 5.0,
            "model.hidden_sizes": (20, 20),
        }
    )
    model = model_lib.make_model(config)
    keys = families.split_keys(1)
    theta = jax.tree.map(lambda a: 3.0 * a, model_lib.init_params(model, keys["init"]))
    batch = helpers.sinusoid_tasks(config.tasks, keys["train"], 0, jnp.arange(32), jnp.float64)
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=config.inner.l2reg)
    solver = inner_lib.make_solver(config, differentiable=False)

    def one(task):
        support = families.support(task)
        x, stats = solver.solve(problem, theta, theta, support)
        return problem.objective(theta, theta, support), problem.objective(x, theta, support), stats

    start, end, stats = jax.jit(jax.vmap(one))(batch)
    if maxls == 1:
        assert int(jnp.sum(stats.linesearch_failures > 0)) == 32  # the premise: line searches do fail
    np.testing.assert_array_less(end, start * (1 + 1e-12) + 1e-15)
    assert bool(jnp.all(jnp.isfinite(end)))


def test_converged_lbfgs_returns_jaxopts_own_solution():
    """Where no line search fails, the safeguarded loop is jaxopt's: the same iterate and count."""
    config = helpers.small_config(**{"inner.tol": 1e-10, "inner.maxiter": 500})
    model = model_lib.make_model(config)
    keys = families.split_keys(config.seed)
    theta = model_lib.init_params(model, keys["init"])
    task = jax.tree.map(lambda a: a[0], helpers.sinusoid_tasks(config.tasks, keys["train"], 0, jnp.arange(1)))
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=config.inner.l2reg)
    flat_objective, theta_flat, _ = inner_lib.flat_problem(problem, theta)
    inner = config.inner
    plain = _plain_lbfgs(flat_objective, inner)
    x_plain, state = jax.jit(plain.run)(theta_flat, theta_flat, families.support(task))
    solver = inner_lib.make_solver(config, differentiable=False)
    x, stats = jax.jit(lambda t, d: solver.solve(problem, t, t, d))(theta, families.support(task))
    assert int(stats.linesearch_failures) == 0 and bool(stats.converged)
    assert int(stats.iterations) == int(state.iter_num)
    np.testing.assert_array_equal(ravel_pytree(x)[0], x_plain)
    assert int(stats.evaluations) == int(state.num_fun_eval)


def test_gd_solver_meta_gradient_matches_dense_hessian_solve():
    """iMAML-GD run to convergence: lambda (H + lambda I)^{-1} grad L_query(x*), with a dense H."""
    fields = {
        "inner.solver": "gd",
        "inner.gd_stepsize": 0.02,
        "inner.l2reg": 2.0,
        "inner.maxiter": 5000,
        "inner.tol": 1e-11,
        "meta_grad.solver_tol": 1e-12,
        "meta_grad.solver_maxiter": 500,
    }
    config = helpers.small_config(**fields)
    model = model_lib.make_model(config)
    keys = families.split_keys(config.seed)
    theta = model_lib.init_params(model, keys["init"])
    task = jax.tree.map(lambda a: a[1], helpers.sinusoid_tasks(config.tasks, keys["train"], 0, jnp.arange(2)))
    grad, metrics = jax.jit(meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config)))(
        theta, task
    )
    assert float(metrics["inner_converged"]) == 1.0 and float(metrics["inner_iterations"]) < 5000

    lam = config.inner.l2reg
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=lam)
    x_star, _ = jax.jit(
        lambda t, d: inner_lib.make_solver(config, differentiable=False).solve(problem, t, t, d)
    )(theta, families.support(task))
    x_flat, unravel = ravel_pytree(x_star)
    hessian = jax.hessian(lambda v: problem.loss(unravel(v), families.support(task)))(x_flat)
    g_query = ravel_pytree(jax.grad(lambda p: model_lib.mse_loss(model, p, *families.query(task)))(x_star))[0]
    exact = lam * jnp.linalg.solve(hessian + lam * jnp.eye(x_flat.size), g_query)
    got = ravel_pytree(grad)[0]
    assert float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)) < 1e-6


def test_gd_solver_takes_the_fixed_steps():
    """K steps of x <- x - alpha (grad L(x) + lambda (x - theta)), counted, when tol is not reached."""
    config = helpers.small_config(**{"inner.solver": "gd", "inner.gd_stepsize": 0.05, "inner.maxiter": 7})
    model = model_lib.make_model(config)
    keys = families.split_keys(config.seed)
    theta = model_lib.init_params(model, keys["init"])
    task = jax.tree.map(lambda a: a[0], helpers.sinusoid_tasks(config.tasks, keys["train"], 0, jnp.arange(1)))
    support = families.support(task)
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=config.inner.l2reg)
    x, stats = jax.jit(
        lambda t, d: inner_lib.make_solver(config, differentiable=False).solve(problem, t, t, d)
    )(theta, support)
    expected = theta
    for _ in range(7):
        g = jax.grad(problem.objective)(expected, theta, support)
        expected = jax.tree.map(lambda a, b: a - 0.05 * b, expected, g)
    np.testing.assert_allclose(ravel_pytree(x)[0], ravel_pytree(expected)[0], rtol=1e-10, atol=1e-12)
    assert int(stats.iterations) == 7 and int(stats.evaluations) == 8
