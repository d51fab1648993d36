"""The inner problem of iMAML and the solvers behind one small interface.

For task data D and meta-parameters theta, the inner solution is

    x*(theta) = argmin_x  L(x; D) + (lambda / 2) ||x - theta||^2,

which satisfies the optimality condition  grad L(x*; D) + lambda (x* - theta) = 0.
Differentiating it gives  dx*/dtheta = lambda (H + lambda I)^{-1},  H the Hessian of L at x*, so a
meta-gradient needs one linear solve  (H + lambda I) v = g  with a symmetric positive definite matrix.

A solver is anything with `solve(problem, init, theta, data) -> (x, InnerStats)`; how `x` depends on
`theta` under `jax.grad` is the solver's business (implicit, unrolled, or not at all). Task data are
always passed as arguments, never captured, so that gradients flow through them correctly.
jaxopt is used here and nowhere else, so that another solver (optimistix, optax L-BFGS with our own
implicit differentiation) can be added beside these.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import jaxopt
import ml_collections
from jax.flatten_util import ravel_pytree

Params = Any
Data = Any


def tree_sq_norm(tree: Params) -> jax.Array:
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree.leaves(tree))


def tree_norm(tree: Params) -> jax.Array:
    return jnp.sqrt(tree_sq_norm(tree))


@dataclasses.dataclass(frozen=True)
class InnerProblem:
    """L(x; data) + (l2reg / 2) ||x - theta||^2, with L a per-task loss (e.g. support-set MSE)."""

    loss: Callable[[Params, Data], jax.Array]
    l2reg: float

    def objective(self, x: Params, theta: Params, data: Data) -> jax.Array:
        diff = jax.tree.map(lambda a, b: a - b, x, theta)
        return self.loss(x, data) + 0.5 * self.l2reg * tree_sq_norm(diff)

    def residual(self, x: Params, theta: Params, data: Data) -> jax.Array:
        """||grad L(x) + lambda (x - theta)||: zero exactly at the inner solution."""
        return tree_norm(jax.grad(self.objective)(x, theta, data))


class PerSolveL2Problem(InnerProblem):
    """The inner problem with lambda read from the data `(task_data, l2reg)`, so that solves with different
    lambdas batch together (evaluation's adapted / scratch_prox / scratch solves)."""

    def objective(self, x, theta, data):
        task_data, l2reg = data
        diff = jax.tree.map(lambda a, b: a - b, x, theta)
        return self.loss(x, task_data) + 0.5 * l2reg * tree_sq_norm(diff)


class InnerStats(NamedTuple):
    """Per-task health of an inner solve (no gradient flows through these)."""

    iterations: jax.Array
    residual: jax.Array  # ||grad of the inner objective|| at the returned point.
    converged: jax.Array  # residual <= tol.
    # Iterations whose line search failed without decreasing the objective (each restarted the L-BFGS
    # history); 0 for fixed-step solvers.
    linesearch_failures: jax.Array
    evaluations: jax.Array  # Evaluations of the inner objective (with its gradient) during the solve.


def _stats(problem: InnerProblem, x, theta, data, iterations, tol, linesearch_failures, evaluations):
    """Measures the residual at the returned point itself rather than trusting a solver's own error."""
    x, theta = jax.lax.stop_gradient(x), jax.lax.stop_gradient(theta)
    residual = problem.residual(x, theta, data)
    return InnerStats(
        iterations=iterations,
        residual=residual,
        converged=residual <= tol,
        linesearch_failures=jnp.asarray(linesearch_failures, jnp.int32),
        evaluations=jnp.asarray(evaluations, jnp.int32),
    )


class InnerSolver(Protocol):
    def solve(
        self, problem: InnerProblem, init: Params, theta: Params, data: Data
    ) -> tuple[Params, InnerStats]: ...


LINEAR_SOLVES = {
    "cg": jaxopt.linear_solve.solve_cg,
    "bicgstab": jaxopt.linear_solve.solve_bicgstab,
    "gmres": jaxopt.linear_solve.solve_gmres,
    "normal_cg": jaxopt.linear_solve.solve_normal_cg,
}


def make_linear_solve(name: str, tol: float, maxiter: int, damping: float = 0.0) -> Callable:
    """The solve for (H + lambda I + damping I) v = g used by implicit differentiation, with explicit
    tolerance and cap. `damping` = 0 is the exact implicit gradient; > 0 shifts every eigenvalue up by
    `damping`, so the matrix stays positive definite while H's eigenvalues are above -(lambda + damping) (a
    non-convex inner loss), at the price of a biased gradient."""
    solve = functools.partial(LINEAR_SOLVES[name], tol=tol, maxiter=maxiter)
    if damping == 0:
        return solve
    return lambda matvec, b, **kwargs: solve(lambda v: matvec(v) + damping * v, b, **kwargs)


def flat_problem(problem: InnerProblem, theta: Params):
    """The objective on ravelled parameters: (x_flat, theta_flat, data) -> scalar, and the unravel map."""
    theta_flat, unravel = ravel_pytree(theta)

    def flat_objective(x_flat, theta_flat, data):
        return problem.objective(unravel(x_flat), unravel(theta_flat), data)

    return flat_objective, theta_flat, unravel


def _solve_flat(run, flat_objective, linear_solve, init_flat, theta_flat, data):
    """`run(init_flat, theta_flat, data) -> (x_flat, aux)`, implicitly differentiated w.r.t. theta_flat.

    With `linear_solve`, the returned x is differentiated as the root of the optimality condition
    grad_x objective(x, theta) = 0 (jaxopt's custom_root; (H + lambda I) v = g solved by `linear_solve`);
    without it, x is a constant of theta. Either way no gradient flows into `init_flat`.
    """
    init_flat = jax.lax.stop_gradient(init_flat)
    if linear_solve is None:
        x_flat, aux = run(init_flat, jax.lax.stop_gradient(theta_flat), data)
        return jax.lax.stop_gradient(x_flat), aux
    optimality = jax.grad(flat_objective)
    differentiated = jaxopt.implicit_diff.custom_root(optimality, has_aux=True, solve=linear_solve)(run)
    return differentiated(init_flat, theta_flat, data)


@dataclasses.dataclass(frozen=True)
class LBFGSSolver:
    """Safeguarded L-BFGS (jaxopt's iteration) started at `init`; implicit in `theta` given `linear_solve`.

    Invariant of the returned point x: objective(x) <= objective(init). A converged solve returns its last
    iterate, as jaxopt's own `run` does (near the optimum roundoff can make the objective tick up while the
    gradient still shrinks); any other returns its iterate of lowest objective, init being the first
    candidate and a NaN never counting as lower. An iteration whose line search fails without decreasing
    the objective restarts the curvature history (the next direction is steepest descent); those are
    counted as `linesearch_failures`. The loop stops after `maxiter` iterations
    or when ||grad objective|| <= `tol`. With `linear_solve=None` x is a constant of theta.
    The iteration runs on the ravelled parameters (one flat vector), and so does the implicit linear solve.

    References: Nocedal and Wright, Numerical Optimization (2006), Algorithm 7.5; jaxopt.LBFGS.
    """

    maxiter: int
    tol: float
    history_size: int = 10
    linesearch: str = "zoom"
    maxls: int = 15
    linear_solve: Callable | None = None

    def solve(self, problem, init, theta, data):
        flat_objective, theta_flat, unravel = flat_problem(problem, theta)
        lbfgs = jaxopt.LBFGS(
            fun=flat_objective,
            maxiter=self.maxiter,
            tol=self.tol,
            history_size=self.history_size,
            linesearch=self.linesearch,
            maxls=self.maxls,
            implicit_diff=False,
        )

        def run(init_flat, theta_flat, data):
            state = lbfgs.init_state(init_flat, theta_flat, data)

            def cond(carry):
                _, state, _, _, _ = carry
                return (state.iter_num < self.maxiter) & (state.error > self.tol)

            def body(carry):
                x, state, best_x, best_value, failures = carry
                previous_value = state.value
                x, state = lbfgs.update(x, state, theta_flat, data)
                # A failed line search that still went downhill (roundoff near the optimum) keeps the history,
                # as jaxopt does; one that did not has put a bad curvature pair in it: restart.
                failed = state.failed_linesearch & ~(state.value < previous_value)
                restart = lambda h: jnp.where(failed, jnp.zeros_like(h), h)
                state = state._replace(
                    s_history=restart(state.s_history),
                    y_history=restart(state.y_history),
                    rho_history=restart(state.rho_history),
                    gamma=jnp.where(failed, jnp.ones_like(state.gamma), state.gamma),
                )
                better = state.value <= best_value  # False for NaN: a NaN iterate is never kept.
                best_x = jnp.where(better, x, best_x)
                best_value = jnp.where(better, state.value, best_value)
                return x, state, best_x, best_value, failures + failed.astype(jnp.int32)

            init_value = jnp.where(jnp.isfinite(state.value), state.value, jnp.inf)
            carry = (init_flat, state, init_flat, init_value, jnp.zeros((), jnp.int32))
            x, state, best_x, _, failures = jax.lax.while_loop(cond, body, carry)
            x = jnp.where((state.error <= self.tol) & (state.value <= init_value), x, best_x)
            return x, (state.iter_num, failures, state.num_fun_eval)

        x_flat, (iterations, failures, evaluations) = _solve_flat(
            run, flat_objective, self.linear_solve, ravel_pytree(init)[0], theta_flat, data
        )
        x = unravel(x_flat)
        return x, _stats(problem, x, theta, data, iterations, self.tol, failures, evaluations)


@dataclasses.dataclass(frozen=True)
class GradientDescentSolver:
    """iMAML-GD (Rajeswaran et al. 2019, section 4): fixed-step gradient descent on the inner objective,
    x <- x - stepsize (grad L(x) + lambda (x - theta)), from `init` for at most `maxiter` steps (fewer when
    ||grad objective|| <= `tol`), implicitly differentiated w.r.t. theta given `linear_solve`: the
    meta-gradient assumes the returned x is the inner solution, as the paper's does.
    """

    maxiter: int
    tol: float
    stepsize: float
    linear_solve: Callable | None = None

    def solve(self, problem, init, theta, data):
        flat_objective, theta_flat, unravel = flat_problem(problem, theta)
        grad = jax.grad(flat_objective)

        def run(init_flat, theta_flat, data):
            def cond(carry):
                _, g, i = carry
                return (i < self.maxiter) & (jnp.linalg.norm(g) > self.tol)

            def body(carry):
                x, g, i = carry
                x = x - self.stepsize * g
                return x, grad(x, theta_flat, data), i + 1

            carry = (init_flat, grad(init_flat, theta_flat, data), jnp.zeros((), jnp.int32))
            x, _, steps = jax.lax.while_loop(cond, body, carry)
            return x, steps

        x_flat, steps = _solve_flat(
            run, flat_objective, self.linear_solve, ravel_pytree(init)[0], theta_flat, data
        )
        x = unravel(x_flat)
        return x, _stats(problem, x, theta, data, steps, self.tol, 0, steps + 1)


@dataclasses.dataclass(frozen=True)
class UnrolledGradientDescent:
    """Plain gradient descent whose iterations are differentiated by reverse mode (the `unrolled` estimator).

    jaxopt's L-BFGS cannot be unrolled: its backward pass is NaN for every line search (a division on the empty
    initial history), so the unrolled baseline is fixed-step gradient descent on the same objective.
    Memory grows linearly with `maxiter`: this is the comparison point for implicit differentiation.
    """

    maxiter: int
    tol: float
    stepsize: float

    def solve(self, problem, init, theta, data):
        solver = jaxopt.GradientDescent(
            fun=problem.objective,
            stepsize=self.stepsize,
            maxiter=self.maxiter,
            tol=self.tol,
            acceleration=False,
            implicit_diff=False,
            unroll=True,
        )
        x, state = solver.run(init, theta, data)
        # One objective gradient per iteration; jaxopt's init_state evaluates nothing.
        return x, _stats(problem, x, theta, data, state.iter_num, self.tol, 0, state.iter_num)


def make_solver(config: ml_collections.ConfigDict, differentiable: bool = True) -> InnerSolver:
    """The inner solver of `inner.solver` for `meta_grad.estimator`; `differentiable=False` gives a solve with
    no gradient (evaluation, studies)."""
    inner, mg = config.inner, config.meta_grad
    if differentiable and mg.estimator == "unrolled":
        return UnrolledGradientDescent(maxiter=inner.maxiter, tol=inner.tol, stepsize=inner.unrolled_stepsize)
    linear_solve = None
    if differentiable and mg.estimator == "implicit":
        linear_solve = make_linear_solve(mg.linear_solver, mg.solver_tol, mg.solver_maxiter, mg.damping)
    if inner.solver == "gd":
        return GradientDescentSolver(
            maxiter=inner.maxiter, tol=inner.tol, stepsize=inner.gd_stepsize, linear_solve=linear_solve
        )
    return LBFGSSolver(
        maxiter=inner.maxiter,
        tol=inner.tol,
        history_size=inner.history_size,
        linesearch=inner.linesearch,
        maxls=inner.maxls,
        linear_solve=linear_solve,
    )


def from_config(
    config: ml_collections.ConfigDict,
    loss: Callable[..., jax.Array],
    *,
    differentiable: bool = True,
    per_solve_l2reg: bool = False,
) -> tuple[InnerProblem, InnerSolver]:
    """The inner problem and its solver, the one place both are built from a config.

    `loss(params, x, y)` is the per-task support loss (a family's loss with its model bound); the problem's
    data are `(x, y)`, or `((x, y), l2reg)` with `per_solve_l2reg` (PerSolveL2Problem).
    """
    problem_class = PerSolveL2Problem if per_solve_l2reg else InnerProblem
    problem = problem_class(loss=lambda params, data: loss(params, *data), l2reg=config.inner.l2reg)
    return problem, make_solver(config, differentiable)
