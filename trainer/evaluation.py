"""Held-out evaluation: adapt to unseen tasks from the meta-learned prior and compare with baselines.

All methods are scored on exactly the same held-out tasks (one task batch, one set of random inits):
  adapted        inner solve (lambda, from theta) on the support set, then the query metrics   <- the result
  prior          theta itself, no adaptation
  zero / chance  the family's trivial predictor: predicting 0 (MSE = mean of y^2) for regression,
                 chance for N-way classification (accuracy 1/N, cross-entropy log N)
  scratch_prox   inner solve with the same lambda, centred at a random initialisation instead of theta
  scratch        unregularised solve (lambda = 0) from a random initialisation (the notebook's "without meta-learning")
Metrics are the family's: query MSE (eval/<method>_mse) for sinusoid; query accuracy and cross-entropy
(eval/<method>_acc, eval/<method>_loss) for omniglot. Each is reported as mean and 95% confidence interval
(1.96 std / sqrt(n)) over tasks (eval/<method>_<metric>_ci95).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainer import config as config_lib
from trainer import families
from trainer import inner_solver as inner_lib
from trainer import mapping as mapping_lib
from trainer import model as model_lib

METHODS = ("adapted", "prior", "zero", "scratch_prox", "scratch")  # Regression's; see `methods(family)`.


def methods(family) -> tuple[str, ...]:
    """The evaluated methods, with the family's trivial baseline in third place."""
    return ("adapted", "prior", family.baseline_name, "scratch_prox", "scratch")


def make_eval_fn(config: ml_collections.ConfigDict, model, family, task_mapping: str):
    """jitted (meta_params, tasks, init_key, task_indices) -> (per-task metrics, adapted, scratch, stats).

    Per-task metrics are {"<method>_<metric>": [T]}. Task i's random init is fold_in(init_key, i). The three
    inner solves per task (from theta with lambda, from a random init with lambda, from a random init with
    lambda = 0) are one mapped solve, so the solver is compiled once; tasks and solves are mapped with
    `task_mapping` ("vmap" or "map").
    """
    problem, solver = inner_lib.from_config(
        config, functools.partial(family.loss, model), differentiable=False, per_solve_l2reg=True
    )
    lam = config.inner.l2reg

    def one_task(meta_params, task, random_init):
        support, query = families.support(task), families.query(task)
        score = lambda params: family.eval_metrics(model, params, *query)
        starts = jax.tree.map(lambda a, b: jnp.stack([a, b, b]), meta_params, random_init)
        l2regs = jnp.asarray([lam, lam, 0.0], dtype=jax.tree.leaves(meta_params)[0].dtype)
        solve = lambda start, l2reg: solver.solve(problem, start, start, (support, l2reg))
        solutions, stats = mapping_lib.map_tasks(solve, task_mapping, starts, l2regs)
        adapted, scratch_prox, scratch = (jax.tree.map(lambda a, i=i: a[i], solutions) for i in range(3))
        scores = {
            "adapted": score(adapted),
            "prior": score(meta_params),
            family.baseline_name: family.baseline(task),
            "scratch_prox": score(scratch_prox),
            "scratch": score(scratch),
        }
        per_task = {
            f"{method}_{metric}": value
            for method, values in scores.items()
            for metric, value in values.items()
        }
        adapted_stats = jax.tree.map(lambda a: a[0], stats)
        return per_task, adapted, scratch, adapted_stats

    def evaluate(meta_params, tasks, init_key, task_indices):
        init_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(init_key, task_indices)
        random_inits = jax.vmap(lambda k: model_lib.init_params(model, k))(init_keys)
        return mapping_lib.map_tasks(
            lambda task, init: one_task(meta_params, task, init), task_mapping, tasks, random_inits
        )

    return jax.jit(evaluate)


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval (0 for one value)."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def summarize(
    per_task: dict[str, Any],
    method_names: tuple[str, ...] = METHODS,
    metric_names: tuple[str, ...] = ("mse",),
) -> dict[str, float]:
    """Flat metrics: eval/<method>_<metric> and eval/<method>_<metric>_ci95 for every method and metric."""
    out = {}
    for method in method_names:
        for metric in metric_names:
            mean, ci = mean_ci95(per_task[f"{method}_{metric}"])
            out[f"eval/{method}_{metric}"] = mean
            out[f"eval/{method}_{metric}_ci95"] = ci
    out["eval/num_tasks"] = int(np.asarray(per_task[f"adapted_{metric_names[0]}"]).size)
    return out


class Evaluator:
    """Evaluates meta-parameters on a fixed set of held-out tasks (same tasks at every evaluation).

    Task i is the family's held-out task fold_in(task_key, i), sampled on device from the family's test data
    (`data`, loaded when None); `eval.batch_size` tasks are solved at a time, mapped with `task_mapping`.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model,
        eval_key: jax.Array,
        family,
        task_mapping: str,
        data=None,
    ):
        self.family = family
        dtype = model_lib.dtype_of(config)
        self.task_key, self.init_key = jax.random.split(eval_key)
        self.num_tasks = config.eval.num_tasks
        self.batch_size = min(config.eval.batch_size or self.num_tasks, self.num_tasks)
        self.methods = methods(self.family)
        self.data = jax.device_put(self.family.load_data(config).test if data is None else data)
        self._sample = jax.jit(lambda data, key, indices: self.family.heldout(data, key, indices, dtype))
        self._eval = make_eval_fn(config, model, family, task_mapping)

    def __call__(self, meta_params) -> tuple[dict[str, float], dict[str, Any]]:
        """Returns the summary metrics and the raw outputs (per-task metrics; adapted params for figures)."""
        keep = self.family.keeps_eval_outputs
        chunks = []
        for start in range(0, self.num_tasks, self.batch_size):
            indices = jnp.arange(start, start + self.batch_size, dtype=jnp.int32)  # Past the end: dropped.
            tasks = self._sample(self.data, self.task_key, indices)
            per_task, adapted, scratch, stats = self._eval(meta_params, tasks, self.init_key, indices)
            chunk = dict(per_task=per_task, converged=stats.converged)
            if keep:
                chunk.update(adapted=adapted, scratch=scratch, tasks=tasks)
            valid = min(self.batch_size, self.num_tasks - start)
            chunks.append(jax.tree.map(lambda a, valid=valid: np.asarray(a)[:valid], chunk))
        outputs = jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)
        per_task = outputs["per_task"]
        summary = summarize(per_task, self.methods, self.family.metric_names)
        summary["eval/inner_converged_fraction"] = float(np.mean(outputs.pop("converged")))
        outputs["losses"] = {m: per_task[f"{m}_{self.family.loss_metric}"] for m in self.methods}
        return summary, outputs


def format_summary(step: int, summary: dict[str, float]) -> str:
    """One line: the reported metric (query accuracy for classification, else MSE) of every method."""
    metric, label = ("acc", "accuracy") if "eval/adapted_acc" in summary else ("mse", "MSE")
    names = [
        m
        for m in ("adapted", "prior", "zero", "chance", "scratch_prox", "scratch")
        if f"eval/{m}_{metric}" in summary
    ]
    parts = [
        f"{m} {summary[f'eval/{m}_{metric}']:.4g} +- {summary[f'eval/{m}_{metric}_ci95']:.2g}" for m in names
    ]
    return f"[eval step {step}] held-out query {label} over {summary['eval/num_tasks']} tasks: " + "; ".join(
        parts
    )


def one_shot_runs_accuracy(
    config: ml_collections.ConfigDict,
    model,
    meta_params,
    runs: dict[str, np.ndarray],
    family,
    task_mapping: str,
) -> dict[str, Any]:
    """Lake et al.'s 20 one-shot runs (`omniglot.load_one_shot_runs`): per run, adapt from theta on the 20
    training images (label c for training class c), then classify the 20 test images.

    Returns the accuracy per run, its mean and 95% CI over runs, and the error rate (Lake et al.'s measure).
    """
    num_runs, ways, size = runs["train"].shape[:3]
    if config.tasks.num_ways != ways or config.tasks.image_size != size:
        raise config_lib.ConfigError(
            f"the one-shot runs are {ways}-way on {size}x{size} images: expected config fields "
            f"'tasks.num_ways' = {ways} and 'tasks.image_size' = {size}, got {config.tasks.num_ways} and "
            f"{config.tasks.image_size}"
        )
    dtype = model_lib.dtype_of(config)
    images = lambda a: jnp.asarray(a, dtype)[..., None] / 255.0
    train_x, test_x = images(runs["train"]), images(runs["test"])
    train_y = jnp.broadcast_to(jnp.arange(ways, dtype=jnp.int32), (num_runs, ways))
    test_y = jnp.asarray(runs["test_labels"], jnp.int32)
    problem, solver = inner_lib.from_config(
        config, functools.partial(family.loss, model), differentiable=False
    )

    @jax.jit
    def score(meta_params, train_x, train_y, test_x, test_y):
        def one_run(xs, ys, xq, yq):
            adapted, stats = solver.solve(problem, meta_params, meta_params, (xs, ys))
            return model_lib.accuracy(model, adapted, xq, yq), stats.converged

        return mapping_lib.map_tasks(one_run, task_mapping, train_x, train_y, test_x, test_y)

    accuracy, converged = (np.asarray(a) for a in score(meta_params, train_x, train_y, test_x, test_y))
    mean, ci = mean_ci95(accuracy)
    return {
        "one_shot_runs/acc": mean,
        "one_shot_runs/acc_ci95": ci,
        "one_shot_runs/error_rate": 1.0 - mean,
        "one_shot_runs/inner_converged_fraction": float(np.mean(converged)),
        "per_run_acc": accuracy,
    }
