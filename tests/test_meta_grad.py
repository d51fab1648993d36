"""Meta-gradients against independent references: dense Hessian solve, finite differences, closed-form ridge,
unrolled differentiation; and the task batch (vmap or lax.map over tasks) against a loop over tasks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tests import helpers
from trainer import families
from trainer import inner_solver as inner_lib
from trainer import mapping as mapping_lib
from trainer import meta_grad as meta_grad_lib
from trainer import model as model_lib


def _setup(num_tasks=4, **overrides):
    config = helpers.small_config(**overrides)
    model = model_lib.make_model(config)
    keys = families.split_keys(config.seed)
    theta = model_lib.init_params(model, keys["init"])
    batch = helpers.sinusoid_tasks(config.tasks, keys["train"], 0, jnp.arange(num_tasks), jnp.float64)
    return config, model, theta, batch


_COMPILED = {}


def _meta_grad_fn(config, model):
    """jitted per-task meta-gradient, shared by tests that use the same config (compiles are the slow part)."""
    key = config.to_json()
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(
            meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config))
        )
    return _COMPILED[key]


def _task(batch, i):
    return jax.tree.map(lambda a: a[i], batch)


def _rel_err(a, b):
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


TIGHT = {
    "inner.tol": 1e-12,
    "inner.maxiter": 2000,
    "meta_grad.solver_tol": 1e-12,
    "meta_grad.solver_maxiter": 500,
}


def _exact_implicit_grad(config, model, theta, task, damping=0.0):
    """lambda (H + (lambda + damping) I)^{-1} grad L_query(x*) with a dense Hessian and a dense solve."""
    lam = config.inner.l2reg
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=lam)
    solver = inner_lib.make_solver(config, differentiable=False)
    x_star, stats = jax.jit(lambda t, d: solver.solve(problem, t, t, d))(theta, families.support(task))
    assert bool(stats.converged), f"inner solve did not converge: residual {stats.residual}"
    x_flat, unravel = ravel_pytree(x_star)
    hessian = jax.hessian(lambda v: problem.loss(unravel(v), families.support(task)))(x_flat)
    g_query = ravel_pytree(jax.grad(lambda p: model_lib.mse_loss(model, p, *families.query(task)))(x_star))[0]
    return unravel(lam * jnp.linalg.solve(hessian + (lam + damping) * jnp.eye(x_flat.size), g_query))


@pytest.mark.parametrize("l2reg", [0.1, 1.0])
def test_implicit_matches_dense_hessian_solve(l2reg):
    config, model, theta, batch = _setup(**TIGHT, **{"inner.l2reg": l2reg})
    task = _task(batch, 0)
    grad, metrics = _meta_grad_fn(config, model)(theta, task)
    assert float(metrics["inner_converged"]) == 1.0
    assert _rel_err(grad, _exact_implicit_grad(config, model, theta, task)) < 1e-4


def test_damped_implicit_gradient_matches_the_damped_dense_solve():
    """meta_grad.damping adds to the diagonal of the solve only (the inner solution is the same): the
    result is the dense lambda (H + (lambda + damping) I)^{-1} g, and differs from the undamped one."""
    config, model, theta, batch = _setup(**TIGHT, **{"meta_grad.damping": 3.0})
    task = _task(batch, 0)
    grad, _ = _meta_grad_fn(config, model)(theta, task)
    assert _rel_err(grad, _exact_implicit_grad(config, model, theta, task, damping=3.0)) < 1e-4
    assert _rel_err(grad, _exact_implicit_grad(config, model, theta, task)) > 1e-2


def test_implicit_matches_finite_differences_of_solution_map():
    config, model, theta, batch = _setup(**TIGHT)
    task = _task(batch, 1)
    grad, _ = _meta_grad_fn(config, model)(theta, task)
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=config.inner.l2reg)
    solver = inner_lib.make_solver(config, differentiable=False)

    @jax.jit
    def meta_loss(t):
        x, _ = solver.solve(problem, t, t, families.support(task))
        return model_lib.mse_loss(model, x, *families.query(task))

    theta_flat, unravel = ravel_pytree(theta)
    grad_flat = ravel_pytree(grad)[0]
    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(3):
        direction = jnp.asarray(rng.standard_normal(theta_flat.size))
        direction = direction / jnp.linalg.norm(direction)
        fd = meta_loss(unravel(theta_flat + eps * direction)) - meta_loss(
            unravel(theta_flat - eps * direction)
        )
        fd = fd / (2 * eps)
        analytic = jnp.vdot(grad_flat, direction)
        assert abs(float(fd - analytic)) < 1e-4 * max(float(jnp.linalg.norm(grad_flat)), 1e-8), (fd, analytic)


def test_default_linear_solve_is_accurate_where_jaxopt_default_is_not():
    """The config default (CG, tol 1e-10) is accurate; jaxopt's own default (normal CG, tol 1e-5) is measurably not."""
    config, model, theta, batch = _setup(**{"inner.tol": 1e-12, "inner.maxiter": 2000, "inner.l2reg": 0.1})
    task = _task(batch, 0)
    exact = _exact_implicit_grad(config, model, theta, task)
    ours, _ = jax.jit(meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config)))(
        theta, task
    )
    config.meta_grad.linear_solver, config.meta_grad.solver_tol = "normal_cg", 1e-5
    loose, _ = jax.jit(meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config)))(
        theta, task
    )
    assert _rel_err(ours, exact) < 1e-4
    assert _rel_err(loose, exact) > 10 * _rel_err(ours, exact)


def test_ridge_meta_gradient_matches_closed_form():
    """A model linear in its parameters: x* = A^{-1} (2/n Phi^T y + lambda theta), A = 2/n Phi^T Phi + lambda I."""
    config, model, theta, batch = _setup(**TIGHT, **{"model.hidden_sizes": (), "inner.l2reg": 0.3})
    task = _task(batch, 2)
    grad, _ = jax.jit(meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config)))(
        theta, task
    )

    lam = config.inner.l2reg
    features = lambda x: np.concatenate([np.ones_like(x), x], axis=1)  # [bias, kernel] ordering below
    phi_s, y_s = features(np.asarray(task["support_x"])), np.asarray(task["support_y"])[:, 0]
    phi_q, y_q = features(np.asarray(task["query_x"])), np.asarray(task["query_y"])[:, 0]
    p = theta["params"]["layers_0"]
    theta_vec = np.array([p["bias"][0], p["kernel"][0, 0]])
    a = 2 / len(y_s) * phi_s.T @ phi_s + lam * np.eye(2)
    x_star = np.linalg.solve(a, 2 / len(y_s) * phi_s.T @ y_s + lam * theta_vec)
    g_query = 2 / len(y_q) * phi_q.T @ (phi_q @ x_star - y_q)
    expected = lam * np.linalg.solve(a, g_query)  # a is symmetric
    g = grad["params"]["layers_0"]
    got = np.array([g["bias"][0], g["kernel"][0, 0]])
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_unrolled_agrees_with_implicit_when_inner_converges_fast():
    overrides = {
        "inner.l2reg": 10.0,
        "inner.tol": 1e-12,
        "inner.maxiter": 800,
        "inner.unrolled_stepsize": 0.005,
        "meta_grad.solver_tol": 1e-12,
        "meta_grad.solver_maxiter": 500,
    }
    config, model, theta, batch = _setup(**overrides)
    task = _task(batch, 0)
    implicit, _ = jax.jit(meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config)))(
        theta, task
    )
    config.meta_grad.estimator = "unrolled"
    unrolled, metrics = jax.jit(
        meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config))
    )(theta, task)
    assert float(metrics["inner_residual"]) < 1e-8, metrics
    assert _rel_err(unrolled, implicit) < 1e-5


def test_first_order_is_query_gradient_at_solution():
    config, model, theta, batch = _setup(**TIGHT)
    task = _task(batch, 0)
    config.meta_grad.estimator = "first_order"
    grad, _ = jax.jit(meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config)))(
        theta, task
    )
    problem = inner_lib.InnerProblem(loss=helpers.support_loss(model), l2reg=config.inner.l2reg)
    x_star, _ = inner_lib.make_solver(config, differentiable=False).solve(
        problem, theta, theta, families.support(task)
    )
    expected = jax.grad(lambda p: model_lib.mse_loss(model, p, *families.query(task)))(x_star)
    assert _rel_err(grad, expected) < 1e-10
    exact = _exact_implicit_grad(config, model, theta, task)
    assert _rel_err(grad, exact) > 1e-3  # First order really is a different (biased) estimator.


@pytest.mark.parametrize("task_mapping", mapping_lib.MAPPINGS)
def test_batch_meta_grad_equals_loop_over_tasks(task_mapping):
    """batch_meta_grad over 4 tasks (vmapped, or one after another with lax.map) is the per-task function
    applied to each task."""
    config, model, theta, batch = _setup(num_tasks=4, **{"inner.tol": 1e-10, "inner.maxiter": 500})
    task_meta_grad = meta_grad_lib.make_task_meta_grad(config, model, families.get_family(config))
    grads_T, metrics_T = jax.jit(
        lambda t, b: meta_grad_lib.batch_meta_grad(task_meta_grad, t, b, task_mapping)
    )(theta, batch)
    single = jax.jit(task_meta_grad)
    for i in range(4):
        grad_i, metrics_i = single(theta, _task(batch, i))
        # lax.map runs the unbatched program (measured: bitwise equal). vmap's batched kernels round
        # differently and L-BFGS amplifies that only mildly: measured 7e-11 at most in a meta-gradient entry
        # (relative 2e-10), 1e-10 relative in the losses, though a task may take a few iterations more or
        # fewer (77 against 69) to cross tol.
        chex.assert_trees_all_close(_task(grads_T, i), grad_i, rtol=1e-8, atol=1e-9)
        losses = ("query_loss", "support_loss")
        chex.assert_trees_all_close(
            {k: metrics_T[k][i] for k in losses}, {k: metrics_i[k] for k in losses}, rtol=1e-8, atol=0
        )
        assert float(metrics_T["inner_converged"][i]) == float(metrics_i["inner_converged"]) == 1.0
