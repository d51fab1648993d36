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
import numpy as np
from jax.flatten_util import ravel_pytree

Params = Any
Data = Any


def tree_vdot(a: Params, b: Params) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def tree_sq_norm(tree: Params) -> jax.Array:
    return tree_vdot(tree, tree)


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


def _stats(
    problem: InnerProblem, x, theta, data, iterations, tol, linesearch_failures, evaluations, gradient=None
):
    """Measures the residual at the returned point itself rather than trusting a solver's own error:
    ||grad objective(x)||, from `gradient` when the solver evaluated exactly that (the objective's gradient
    at the returned x), else evaluated here."""
    x, theta = jax.lax.stop_gradient(x), jax.lax.stop_gradient(theta)
    if gradient is None:
        residual = problem.residual(x, theta, data)
    else:
        residual = tree_norm(jax.lax.stop_gradient(gradient))
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


def solve_cg(matvec: Callable, b: Params, tol: float = 1e-5, maxiter: int | None = None) -> Params:
    """Conjugate gradients for A v = b (A symmetric positive definite), started at v = 0.

    The iteration of `jax.scipy.sparse.linalg.cg` (stop when ||r|| <= tol ||b||, or after `maxiter`
    products), except that the first residual is b itself: A 0 is not evaluated, so `maxiter` steps cost
    `maxiter` products with A, not one more.
    """
    maxiter = 10 * sum(leaf.size for leaf in jax.tree.leaves(b)) if maxiter is None else maxiter
    bound = jnp.square(tol) * tree_vdot(b, b)
    axpy = lambda alpha, x, y: jax.tree.map(lambda u, w: alpha * u + w, x, y)

    def cond(carry):
        _, _, gamma, _, k = carry
        return (gamma > bound) & (k < maxiter)

    def body(carry):
        v, r, gamma, p, k = carry
        ap = matvec(p)
        alpha = gamma / tree_vdot(p, ap)
        v, r = axpy(alpha, p, v), axpy(-alpha, ap, r)
        gamma_next = tree_vdot(r, r)
        return v, r, gamma_next, axpy(gamma_next / gamma, p, r), k + 1

    zeros = jax.tree.map(jnp.zeros_like, b)
    v, *_ = jax.lax.while_loop(cond, body, (zeros, b, tree_vdot(b, b), b, 0))
    return v


LINEAR_SOLVES = {
    "cg": solve_cg,
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


def implicit_root(run: Callable, objective: Callable, linear_solve: Callable) -> Callable:
    """`run(init, theta, data) -> (x, aux)` with x differentiated as the minimiser of `objective(x, theta,
    data)`, i.e. the root of its gradient F(x, theta, data) = 0, by the implicit function theorem.

    For a cotangent g of x the backward pass solves (dF/dx) u = g with `linear_solve` and returns
    -(dF/dtheta)^T u (and -(dF/ddata)^T u when the data are differentiated; nothing is computed for them
    otherwise). dF/dx is the Hessian of the objective, symmetric, so its products are forward-over-reverse
    Jacobian-vector products of F, linearized once at x (`jax.linearize`). No gradient flows into `init`
    or `aux`. The same maths as jaxopt's `custom_root`, which transposes reverse-over-reverse products.
    """
    optimality = jax.grad(objective)

    @jax.custom_vjp
    def root(init, theta, data):
        return run(init, theta, data)

    def values(tree):
        return jax.tree.map(lambda p: p.value, tree, is_leaf=_is_primal)

    def fwd(init, theta, data):
        init, theta, data_values = values(init), values(theta), values(data)
        x, aux = run(init, theta, data_values)
        # Whether the data are differentiated, carried as the residuals' structure (None or ()).
        data_perturbed = () if any(p.perturbed for p in jax.tree.leaves(data, is_leaf=_is_primal)) else None
        return (x, aux), (init, x, theta, data_values, data_perturbed)

    def bwd(residuals, cotangents):
        init, x, theta, data, data_perturbed = residuals
        x_cotangent = cotangents[0]
        zero_init = jax.tree.map(jnp.zeros_like, init)
        if isinstance(x_cotangent, jax.custom_derivatives.SymbolicZero):
            return zero_init, jax.tree.map(jnp.zeros_like, theta), _zero_cotangents(data)
        _, hessian_product = jax.linearize(lambda z: optimality(z, theta, data), x)
        u = linear_solve(hessian_product, x_cotangent)
        minus_u = jax.tree.map(jnp.negative, u)
        if data_perturbed is None:
            _, vjp = jax.vjp(lambda t: optimality(x, t, data), theta)
            return zero_init, vjp(minus_u)[0], _zero_cotangents(data)
        _, vjp = jax.vjp(lambda t, d: optimality(x, t, d), theta, data)
        return zero_init, *vjp(minus_u)

    root.defvjp(fwd, bwd, symbolic_zeros=True)
    return root


_Primal = jax.custom_derivatives.CustomVJPPrimal
_is_primal = lambda p: isinstance(p, _Primal)


def _zero_cotangents(tree):
    """Zero cotangents for `tree` (float0 for integer leaves, as JAX expects)."""

    def zero(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            return jnp.zeros_like(leaf)
        return np.zeros(jnp.shape(leaf), jax.dtypes.float0)

    return jax.tree.map(zero, tree)


def _solve_flat(run, flat_objective, linear_solve, init_flat, theta_flat, data):
    """`run(init_flat, theta_flat, data) -> (x_flat, aux)`, implicitly differentiated w.r.t. theta_flat.

    With `linear_solve`, the returned x is differentiated as the minimiser of `flat_objective`
    (`implicit_root`; (H + lambda I) v = g solved by `linear_solve`); without it, x is a constant of theta.
    Either way no gradient flows into `init_flat`.
    """
    init_flat = jax.lax.stop_gradient(init_flat)
    if linear_solve is None:
        x_flat, aux = run(init_flat, jax.lax.stop_gradient(theta_flat), data)
        return jax.lax.stop_gradient(x_flat), aux
    return implicit_root(run, flat_objective, linear_solve)(init_flat, theta_flat, data)


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
            x, g, steps = jax.lax.while_loop(cond, body, carry)
            return x, (steps, g)  # g: the objective's gradient at the returned x.

        x_flat, (steps, g) = _solve_flat(
            run, flat_objective, self.linear_solve, ravel_pytree(init)[0], theta_flat, data
        )
        x = unravel(x_flat)
        return x, _stats(problem, x, theta, data, steps, self.tol, 0, steps + 1, gradient=g)


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
