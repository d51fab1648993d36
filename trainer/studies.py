"""Studies of a meta-learned prior beyond one evaluation: K-shot curves and hyper-parameter sweeps.

  kshot_curves  held-out query metric against the number of support points K and the inner iteration
                budget (Finn et al. 2017, figure 2, for iMAML): for each K, a full evaluation (every baseline
                of `evaluation`, same tasks) plus the adapted metric at each budget (budget 0 = the prior)
  sweep         one training run per value of a config field (e.g. inner.l2reg), each in its own workdir
                (resumable), and the final held-out evaluation of each, as in the iMAML paper's lambda study
Both return JSON-ready records; `write_*` add a markdown table and a figure beside them.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from trainer import config as config_lib
from trainer import evaluation, monitoring, train
from trainer import families as families_lib
from trainer import figures as figures_lib
from trainer import inner_solver as inner_lib
from trainer import mapping as mapping_lib


def split_field(config: ml_collections.ConfigDict, field: str) -> tuple[str, str]:
    """("group", "name") of a config field "group.name" ("tasks.options", "degree" for an imported family's
    field); a ConfigError when there is no such field."""
    group, _, name = field.rpartition(".")
    if not group or field not in config_lib.flatten(config):
        raise config_lib.ConfigError(f"{field!r} is not a config field (expected GROUP.FIELD)")
    return group, name


def _adapted_metric_fn(config: ml_collections.ConfigDict, model, family, task_mapping: str) -> Callable:
    """jitted (meta_params, tasks) -> per-task held-out metric of the solve from theta (config's budget)."""
    problem, solver = inner_lib.from_config(
        config, functools.partial(family.loss, model), differentiable=False
    )
    metric = family.metric_names[0]

    def one_task(meta_params, task):
        adapted, _ = solver.solve(problem, meta_params, meta_params, families_lib.support(task))
        return family.eval_metrics(model, adapted, *families_lib.query(task))[metric]

    return jax.jit(
        lambda meta_params, tasks: mapping_lib.map_tasks(
            lambda task: one_task(meta_params, task), task_mapping, tasks
        )
    )


def kshot_curves(
    config: ml_collections.ConfigDict,
    meta_params: Any,
    eval_key: jax.Array,
    family,
    task_mapping: str,
    shots: Sequence[int] = (5, 10, 20),
    budgets: Sequence[int] = (0, 1, 2, 5, 10, 20),
    num_tasks: int | None = None,
) -> dict[str, Any]:
    """Held-out metric against K (support points) and inner iteration budget, on the same tasks per K.

    For each K the held-out tasks are the evaluation's tasks i = 0..num_tasks-1 with K support points (their
    query points and functions do not depend on K for sinusoid). `budgets` are inner L-BFGS iteration caps
    of the adapted solve (0: the prior, not adapted); the full evaluation at config.inner.maxiter gives every
    baseline of `evaluation.methods` on the same tasks. Tasks and solves are mapped with `task_mapping`.
    """
    if not isinstance(family, families_lib.Regression):
        raise config_lib.ConfigError(
            f"K-shot curves vary 'tasks.num_support' of regression tasks (families.Regression); got "
            f"tasks.family = {config.tasks.family!r} (use the evaluation's N-way K-shot configs instead)"
        )
    if not shots or min(shots) < 1 or (budgets and min(budgets) < 0):
        raise config_lib.ConfigError(f"shots must be >= 1 and budgets >= 0; got {shots} and {budgets}")
    num_tasks = num_tasks or config.eval.num_tasks
    model = family.make_model(config)
    metric = family.metric_names[0]
    rows = []
    for k in shots:
        config_k = config_lib.with_fields(
            config, {"tasks.num_support": int(k), "eval.num_tasks": int(num_tasks)}
        )
        evaluator = evaluation.Evaluator(config_k, model, eval_key, family, task_mapping)
        summary, outputs = evaluator(meta_params)
        tasks = outputs["tasks"]  # The evaluation's own tasks: every budget is scored on them.
        by_budget = {}
        for budget in budgets:
            if budget == 0:
                mean, ci = summary[f"eval/prior_{metric}"], summary[f"eval/prior_{metric}_ci95"]
            else:
                config_b = config_lib.with_fields(config_k, {"inner.maxiter": int(budget)})
                fn = _adapted_metric_fn(config_b, model, family, task_mapping)
                mean, ci = evaluation.mean_ci95(np.asarray(fn(meta_params, tasks)))
            by_budget[str(budget)] = dict(mean=mean, ci95=ci)
        rows.append(
            dict(
                shots=int(k),
                budgets=by_budget,
                methods={
                    m: dict(mean=summary[f"eval/{m}_{metric}"], ci95=summary[f"eval/{m}_{metric}_ci95"])
                    for m in evaluator.methods
                },
                inner_converged_fraction=summary["eval/inner_converged_fraction"],
            )
        )
    return dict(
        metric=metric,
        num_tasks=int(num_tasks),
        full_budget=int(config.inner.maxiter),
        shots=[int(k) for k in shots],
        budgets=[int(b) for b in budgets],
        rows=rows,
    )


def kshot_table(record: dict[str, Any]) -> str:
    metric = record["metric"]
    budgets = record["budgets"]
    methods = list(record["rows"][0]["methods"])
    head = (
        [f"budget {b}" if b else "prior (0 it.)" for b in budgets]
        + [f"adapted ({record['full_budget']} it. cap)"]
        + [m for m in methods if m not in ("adapted", "prior")]
    )
    lines = [
        f"Held-out query {metric.upper()} (mean +- 95% CI over {record['num_tasks']} tasks) against K support "
        "points and the inner L-BFGS iteration budget of the adaptation from the meta-learned prior.",
        "",
        "| K | " + " | ".join(head) + " |",
        "|---:|" + "---:|" * len(head),
    ]
    cell = lambda v: f"{v['mean']:.3g} +- {v['ci95']:.2g}"
    for row in record["rows"]:
        cells = [cell(row["budgets"][str(b)]) for b in budgets] + [cell(row["methods"]["adapted"])]
        cells += [cell(row["methods"][m]) for m in methods if m not in ("adapted", "prior")]
        lines.append(f"| {row['shots']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kshot_figure(record: dict[str, Any]) -> Figure:
    """Metric against the inner budget, one line per K (the full-budget point at the right end)."""
    fig = Figure(figsize=(6.5, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    budgets = list(record["budgets"]) + [record["full_budget"]]
    for row in record["rows"]:
        values = [row["budgets"][str(b)] for b in record["budgets"]] + [row["methods"]["adapted"]]
        means = np.array([v["mean"] for v in values])
        cis = np.array([v["ci95"] for v in values])
        xs = np.array(budgets, np.float64)
        line = ax.plot(xs + 1, means, marker="o", label=f"K = {row['shots']}")[0]
        ax.fill_between(xs + 1, means - cis, means + cis, color=line.get_color(), alpha=0.15)
    baseline = next(m for m in record["rows"][0]["methods"] if m not in ("adapted", "prior"))
    ax.axhline(record["rows"][0]["methods"][baseline]["mean"], color="gray", ls=":", label=baseline)
    ax.set_xscale("log")
    ax.set_xticks([b + 1 for b in budgets], [str(b) for b in budgets])
    ax.set_yscale("log")
    ax.set_xlabel("inner L-BFGS iterations (0: the prior, not adapted)")
    ax.set_ylabel(f"held-out query {record['metric']}")
    ax.set_title(f"K-shot adaptation from the meta-learned prior ({record['num_tasks']} tasks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def write_record(record: dict[str, Any], stem: str, table: str, figure: Figure) -> list[str]:
    """Writes <stem>.json, <stem>.md and <stem>.png; returns their paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(record, indent=2)), (".md", table + "\n")):
        with open(stem + suffix + ".tmp", "w") as f:
            f.write(text)
        os.replace(stem + suffix + ".tmp", stem + suffix)
        paths.append(stem + suffix)
    paths.append(figures_lib.save_png(figures_lib.render(figure), stem + ".png"))
    return paths


def _value_name(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _last_evaluation(workdir: str, metric: str) -> dict[str, Any]:
    """The last held-out evaluation a run wrote to its metrics.jsonl."""
    records = [
        r
        for r in monitoring.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if f"eval/adapted_{metric}" in r
    ]
    if not records:
        raise config_lib.ConfigError(f"{workdir}: finished, but its metrics.jsonl holds no evaluation")
    return records[-1]


def sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    field: str,
    values: Sequence[Any],
    train_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
) -> dict[str, Any]:
    """Trains `config` with `field` set to each value in workdir/<field>_<value> and collects final evals.

    Every run is an ordinary, resumable training run (rerunning the sweep resumes unfinished ones); all
    values are validated before the first run starts. `train_fn(config, workdir)` returns the TrainResult
    (train.train_and_evaluate by default).
    """
    _, name = split_field(config, field)
    if not values:
        raise config_lib.ConfigError(f"sweep over {field}: no values given")
    configs = [config_lib.with_fields(config, {field: v}) for v in values]  # Fails before any training.
    train_fn = train_fn or train.train_and_evaluate
    family = families_lib.get_family(config)
    metric, methods = family.metric_names[0], evaluation.methods(family)
    rows = []
    for value, run_config in zip(values, configs, strict=True):
        run_dir = os.path.join(workdir, f"{name}_{_value_name(value)}")
        result = train_fn(run_config, run_dir)
        summary = result.eval_summary or _last_evaluation(run_dir, metric)  # Empty: it had finished before.
        rows.append(
            dict(
                value=value,
                workdir=os.path.abspath(run_dir),
                final_step=int(run_config.train.num_steps),
                methods={
                    m: dict(mean=summary[f"eval/{m}_{metric}"], ci95=summary[f"eval/{m}_{metric}_ci95"])
                    for m in methods
                },
                inner_converged_fraction=summary.get("eval/inner_converged_fraction"),
                num_tasks=summary.get("eval/num_tasks"),
            )
        )
    better = min if metric in ("mse", "loss") else max
    best = better(rows, key=lambda r: r["methods"]["adapted"]["mean"])
    return dict(field=field, metric=metric, rows=rows, best_value=best["value"])


def sweep_table(record: dict[str, Any]) -> str:
    methods = list(record["rows"][0]["methods"])
    lines = [
        f"Final held-out query {record['metric'].upper()} (mean +- 95% CI over {record['rows'][0]['num_tasks']} "
        f"tasks) against {record['field']}; best adapted: {record['field']} = {record['best_value']}.",
        "",
        f"| {record['field']} | " + " | ".join(methods) + " | adapted solves converged |",
        "|---:|" + "---:|" * (len(methods) + 1),
    ]
    for row in record["rows"]:
        cells = [f"{row['methods'][m]['mean']:.3g} +- {row['methods'][m]['ci95']:.2g}" for m in methods]
        converged = row["inner_converged_fraction"]
        converged = "—" if converged is None else f"{converged:.0%}"
        lines.append(f"| {row['value']} | " + " | ".join(cells) + f" | {converged} |")
    return "\n".join(lines)


def sweep_figure(record: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(6.5, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    values = np.array([float(r["value"]) for r in record["rows"]])
    for method in record["rows"][0]["methods"]:
        means = np.array([r["methods"][method]["mean"] for r in record["rows"]])
        cis = np.array([r["methods"][method]["ci95"] for r in record["rows"]])
        ax.errorbar(values, means, yerr=cis, marker="o", capsize=3, label=method)
    if np.all(values > 0):
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(record["field"])
    ax.set_ylabel(f"final held-out query {record['metric']}")
    ax.set_title(f"{record['field']} sweep")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
