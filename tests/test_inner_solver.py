"""Inner solvers: the safeguarded L-BFGS never returns a point worse than its start (on a task that makes
jaxopt's plain L-BFGS fail), iMAML-GD's implicit meta-gradient matches a dense Hessian solve, every solver gives
the same solve on a parameter pytree as on its ravelled vector, and InnerStats describe the returned point."""

import functools
import os
import warnings
from typing import Any, NamedTuple

import chex
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
    chex.assert_trees_all_close(x, expected, rtol=1e-10, atol=1e-12)
    assert int(stats.iterations) == 7 and int(stats.evaluations) == 8


# The three solvers as `make_solver` builds them for training (differentiable), each stopped two ways: after 5
# iterations (tol out of reach: an intermediate iterate) and at convergence (tol 1e-9, well inside maxiter).
# lambda = 5 makes the task's inner objective convex near its solution (Hessian eigenvalues 3.7 to 115 there)
# and a fixed step of 0.01 stable; gradient descent converges in ~460 steps.
SOLVE_FIELDS = {"inner.l2reg": 5.0}
SMALLEST_CURVATURE = 3.6
SOLVER_FIELDS = {
    "lbfgs": {"inner.solver": "lbfgs"},
    "gd": {"inner.solver": "gd", "inner.gd_stepsize": 0.01},
    "unrolled": {"meta_grad.estimator": "unrolled", "inner.unrolled_stepsize": 0.01},
}
STOP_FIELDS = {
    "truncated": {"inner.maxiter": 5, "inner.tol": 1e-14},
    "converged": {"inner.maxiter": 1000, "inner.tol": 1e-9},
}
SOLVER_CASES = [(solver, stop) for solver in SOLVER_FIELDS for stop in STOP_FIELDS]


class _Solves(NamedTuple):
    config: Any
    model: Any
    theta: Any
    support: Any
    tree: tuple  # (x, stats) on the parameter pytree
    flat: tuple  # (x_flat, stats) on the same problem written on one flat vector
    loss_calls: int  # evaluations of the support loss in the pytree solve, counted by a callback


@functools.cache
def _solve_tree_and_flat(solver_name, stop) -> _Solves:
    """One task's inner solve from theta on the MLP's parameter pytree, and on one flat vector (the loss of
    unravel(v)); cached, as several tests look at the same solves (the compiles are the slow part)."""
    config = helpers.small_config(**SOLVE_FIELDS, **SOLVER_FIELDS[solver_name], **STOP_FIELDS[stop])
    model = model_lib.make_model(config)
    keys = families.split_keys(config.seed)
    theta = model_lib.init_params(model, keys["init"])
    task = helpers.sinusoid_tasks(config.tasks, keys["train"], 0, jnp.arange(1), jnp.float64)
    support = families.support(jax.tree.map(lambda a: a[0], task))
    theta_flat, unravel = ravel_pytree(theta)
    loss = helpers.support_loss(model)
    calls = []

    def counted_loss(params, data):
        jax.debug.callback(lambda: calls.append(None))
        return loss(params, data)

    tree_problem = inner_lib.InnerProblem(loss=counted_loss, l2reg=config.inner.l2reg)
    flat_problem = inner_lib.InnerProblem(
        loss=lambda v, data: loss(unravel(v), data), l2reg=config.inner.l2reg
    )
    solver = inner_lib.make_solver(config, differentiable=True)
    solve = lambda problem, init: jax.jit(lambda t, d: solver.solve(problem, t, t, d))(init, support)
    tree = solve(tree_problem, theta)
    jax.effects_barrier()
    return _Solves(config, model, theta, support, tree, solve(flat_problem, theta_flat), len(calls))


@pytest.mark.parametrize("solver_name,stop", SOLVER_CASES)
def test_pytree_and_flat_parameters_give_the_same_solve(solver_name, stop):
    """The solvers work on pytrees of parameters: the same problem on one ravelled vector gives the same point
    and the same InnerStats, to roundoff (after 5 iterations). The two programs round differently (one squared
    norm of the vector against a sum over leaves, for one), and over a converged solve's iterations that
    grows to the solve's own accuracy: two points with residual <= tol lie within 2 tol / (smallest
    curvature) of each other. Measured here: bitwise equal points for all six; with lambda = 1 on another task,
    L-BFGS's converged points differed by 2e-10."""
    solves = _solve_tree_and_flat(solver_name, stop)
    (x, stats), (x_flat, flat_stats) = solves.tree, solves.flat
    assert jax.tree.structure(x) == jax.tree.structure(solves.theta) and x_flat.ndim == 1
    assert not np.allclose(x_flat, ravel_pytree(solves.theta)[0])  # the solve moved
    integer_stats = ("iterations", "converged", "linesearch_failures", "evaluations")
    chex.assert_trees_all_equal(*[{k: getattr(s, k) for k in integer_stats} for s in (stats, flat_stats)])
    if stop == "truncated":
        chex.assert_trees_all_close(ravel_pytree(x)[0], x_flat, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(stats.residual, flat_stats.residual, rtol=1e-10)
    else:
        tol = solves.config.inner.tol
        chex.assert_trees_all_close(ravel_pytree(x)[0], x_flat, rtol=0, atol=2 * tol / SMALLEST_CURVATURE)


@pytest.mark.parametrize("solver_name,stop", SOLVER_CASES)
def test_inner_stats_describe_the_returned_point(solver_name, stop):
    """residual = ||grad L(x) + lambda (x - theta)|| at the returned x (here by jax.grad of the objective
    written out again), converged = residual <= tol, iterations within maxiter; iMAML-GD counts one gradient
    evaluation per step plus the first; the fixed-step solvers report no line-search failures."""
    solves = _solve_tree_and_flat(solver_name, stop)
    model, theta, (x, stats) = solves.model, solves.theta, solves.tree
    inner, lam = solves.config.inner, solves.config.inner.l2reg

    def objective(p):
        sq = sum(
            jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(theta), strict=True)
        )
        return model_lib.mse_loss(model, p, *solves.support) + 0.5 * lam * sq

    residual = float(jnp.linalg.norm(ravel_pytree(jax.grad(objective)(x))[0]))
    np.testing.assert_allclose(float(stats.residual), residual, rtol=1e-6)
    assert bool(stats.converged) == (float(stats.residual) <= inner.tol)
    assert bool(stats.converged) == (stop == "converged")  # the premise of each stop
    if stop == "truncated":
        assert int(stats.iterations) == inner.maxiter
    else:
        assert 1 <= int(stats.iterations) < inner.maxiter
    if solver_name == "gd":
        assert int(stats.evaluations) == int(stats.iterations) + 1
    if solver_name != "lbfgs":
        assert int(stats.linesearch_failures) == 0


@pytest.mark.parametrize("solver_name,stop", SOLVER_CASES)
def test_evaluations_count_the_solves_loss_evaluations(solver_name, stop):
    """InnerStats.evaluations against a callback in the loss counting its evaluations: every one is the solve's,
    but for one more where the residual at the returned point is evaluated afterwards (iMAML-GD's is the norm
    of the gradient its last step evaluated there, so nothing is evaluated twice)."""
    solves = _solve_tree_and_flat(solver_name, stop)
    residual_evaluations = 0 if solver_name == "gd" else 1
    assert int(solves.tree[1].evaluations) == solves.loss_calls - residual_evaluations


def _spd_system(n=12, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    return jnp.asarray(m @ m.T + 0.5 * np.eye(n)), jnp.asarray(rng.standard_normal(n))


@pytest.mark.parametrize("maxiter", [1, 5, 200])
def test_cg_is_scipys_iteration_without_the_product_with_zero(maxiter):
    """solve_cg is jax.scipy's CG started at zero, bitwise, but evaluates A exactly `maxiter` times (jax.scipy
    evaluates A 0 first); run long enough it solves the system to its tolerance."""
    import jax.scipy.sparse.linalg as sparse_linalg

    a, b = _spd_system()
    products = {"ours": [], "scipy": []}

    def counted(name):
        def matvec(v):
            jax.debug.callback(lambda: products[name].append(None))
            return a @ v

        return matvec

    ours = inner_lib.solve_cg(counted("ours"), b, tol=1e-13, maxiter=maxiter)
    reference = sparse_linalg.cg(counted("scipy"), b, tol=1e-13, maxiter=maxiter)[0]
    jax.effects_barrier()
    np.testing.assert_array_equal(ours, reference)
    assert len(products["scipy"]) == len(products["ours"]) + 1
    if maxiter < 12:  # fewer steps than unknowns: the tolerance is out of reach
        assert len(products["ours"]) == maxiter
    else:
        np.testing.assert_allclose(a @ ours, b, atol=1e-10)


def _ridge_root(lam=0.7):
    """x*(theta, (phi, y)) = argmin ||phi x - y||^2 / n + lam / 2 ||x - theta||^2, found by a dense solve inside
    `implicit_root`, and the same map in closed form (differentiated by plain reverse mode)."""

    def objective(x, theta, data):
        phi, y = data
        return jnp.mean((phi @ x - y) ** 2) + 0.5 * lam * jnp.sum((x - theta) ** 2)

    def closed_form(theta, data):
        phi, y = data
        n, d = phi.shape
        return jnp.linalg.solve(2 / n * phi.T @ phi + lam * jnp.eye(d), 2 / n * phi.T @ y + lam * theta)

    run = lambda init, theta, data: (closed_form(theta, data), jnp.zeros((), jnp.int32))
    solve = functools.partial(inner_lib.solve_cg, tol=1e-14, maxiter=100)
    return inner_lib.implicit_root(run, objective, solve), closed_form


def test_implicit_root_gradients_match_the_closed_form_for_theta_and_for_the_data():
    """implicit_root's gradients w.r.t. theta alone, and w.r.t. theta and the data together, equal reverse mode
    through the closed-form solution of a ridge problem; none flows into the initial point."""
    root, closed_form = _ridge_root()
    rng = np.random.default_rng(1)
    phi, y = jnp.asarray(rng.standard_normal((9, 4))), jnp.asarray(rng.standard_normal(9))
    theta, init, q = (jnp.asarray(rng.standard_normal(4)) for _ in range(3))
    meta = lambda theta, data, init: jnp.vdot(q, root(init, theta, data)[0]) ** 2
    reference = lambda theta, data: jnp.vdot(q, closed_form(theta, data)) ** 2

    g_theta = jax.jit(jax.grad(meta))(theta, (phi, y), init)
    np.testing.assert_allclose(g_theta, jax.grad(reference)(theta, (phi, y)), rtol=1e-9)
    g_all = jax.jit(jax.grad(meta, argnums=(0, 1, 2)))(theta, (phi, y), init)
    expected = jax.grad(reference, argnums=(0, 1))(theta, (phi, y))
    chex.assert_trees_all_close(g_all[:2], expected, rtol=1e-9)
    np.testing.assert_array_equal(g_all[2], np.zeros(4))
