"""Held-out evaluation: adapt to unseen tasks from the meta-learned prior and compare with baselines.

All methods are scored on exactly the same held-out tasks (one task batch, one set of random inits):
  adapted        inner solve (lambda, from theta) on the support set, then query MSE   <- the result
  prior          query MSE of theta itself, no adaptation
  zero           query MSE of predicting 0 (the trivial predictor: mean of y^2)
  scratch_prox   inner solve with the same lambda, centred at a random initialisation instead of theta
  scratch        unregularised solve (lambda = 0) from a random initialisation (the notebook's "without meta-learning")
Each is reported as mean and 95% confidence interval (1.96 std / sqrt(n)) over tasks.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainer import inner_solver as inner_lib
from trainer import meta_grad as meta_grad_lib
from trainer import model as model_lib
from trainer import tasks as tasks_lib

METHODS = ("adapted", "prior", "zero", "scratch_prox", "scratch")


class _PerSolveL2Problem(inner_lib.InnerProblem):
    """The inner problem with lambda read from the data, so solves with different lambdas batch together."""

    def objective(self, x, theta, data):
        task_data, l2reg = data
        diff = jax.tree.map(lambda a, b: a - b, x, theta)
        return self.loss(x, task_data) + 0.5 * l2reg * inner_lib.tree_sq_norm(diff)


def make_eval_fn(config: ml_collections.ConfigDict, model):
    """jitted (meta_params, tasks, init_key) -> (per-task query MSE of every method, adapted, scratch, stats).

    The three inner solves per task (from theta with lambda, from a random init with lambda, from a random init
    with lambda = 0) are one vmapped solve, so the solver is compiled once.
    """
    solver = meta_grad_lib.make_inner_solver(config, differentiable=False)
    problem = _PerSolveL2Problem(loss=meta_grad_lib.support_loss_fn(model), l2reg=config.inner.l2reg)
    lam = config.inner.l2reg

    def one_task(meta_params, task, random_init):
        support, query = tasks_lib.support(task), tasks_lib.query(task)
        query_mse = lambda params: model_lib.mse_loss(model, params, *query)
        starts = jax.tree.map(lambda a, b: jnp.stack([a, b, b]), meta_params, random_init)
        l2regs = jnp.asarray([lam, lam, 0.0], dtype=jax.tree.leaves(meta_params)[0].dtype)
        solve = lambda start, l2reg: solver.solve(problem, start, start, (support, l2reg))
        solutions, stats = jax.vmap(solve)(starts, l2regs)
        adapted, scratch_prox, scratch = (jax.tree.map(lambda a, i=i: a[i], solutions) for i in range(3))
        losses = dict(adapted=query_mse(adapted), prior=query_mse(meta_params),
                      zero=jnp.mean(query[1] ** 2), scratch_prox=query_mse(scratch_prox),
                      scratch=query_mse(scratch))
        adapted_stats = jax.tree.map(lambda a: a[0], stats)
        return losses, adapted, scratch, adapted_stats

    def evaluate(meta_params, tasks, init_key):
        num_tasks = tasks["query_x"].shape[0]
        init_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(init_key, jnp.arange(num_tasks))
        random_inits = jax.vmap(lambda k: model_lib.init_params(model, k))(init_keys)
        return jax.vmap(one_task, in_axes=(None, 0, 0))(meta_params, tasks, random_inits)

    return jax.jit(evaluate)


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval (0 for one value)."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def summarize(per_task_losses: dict[str, Any]) -> dict[str, float]:
    """Flat metrics: eval/<method>_mse and eval/<method>_mse_ci95 for every method."""
    out = {}
    for method in METHODS:
        mean, ci = mean_ci95(per_task_losses[method])
        out[f"eval/{method}_mse"] = mean
        out[f"eval/{method}_mse_ci95"] = ci
    out["eval/num_tasks"] = int(np.asarray(per_task_losses["adapted"]).size)
    return out


class Evaluator:
    """Evaluates meta-parameters on a fixed set of held-out tasks (same tasks at every evaluation)."""

    def __init__(self, config: ml_collections.ConfigDict, model, eval_key: jax.Array):
        dtype = model_lib.dtype_of(config)
        task_key, self.init_key = jax.random.split(eval_key)
        self.tasks = tasks_lib.heldout_tasks(config.tasks, task_key, config.eval.num_tasks, dtype)
        self._eval = make_eval_fn(config, model)

    def __call__(self, meta_params) -> tuple[dict[str, float], dict[str, Any]]:
        """Returns the summary metrics and the raw outputs (per-task losses, adapted params) for figures."""
        losses, adapted, scratch, stats = self._eval(meta_params, self.tasks, self.init_key)
        losses = jax.tree.map(np.asarray, losses)
        summary = summarize(losses)
        summary["eval/inner_converged_fraction"] = float(np.mean(np.asarray(stats.converged)))
        return summary, dict(losses=losses, adapted=adapted, scratch=scratch, tasks=self.tasks)


def format_summary(step: int, summary: dict[str, float]) -> str:
    parts = [f"{m} {summary[f'eval/{m}_mse']:.4g} +- {summary[f'eval/{m}_mse_ci95']:.2g}" for m in METHODS]
    return (f"[eval step {step}] held-out query MSE over {summary['eval/num_tasks']} tasks: "
            + "; ".join(parts))
