"""Held-out evaluation of a run: `python -m trainer.evaluate --workdir=DIR [--num_tasks=N] [--step=S]`.

Restores the latest (or the given) checkpoint with the config saved inside it (a `DIR/config.json` that
differs, e.g. edited or left by another run, is reported by field and not used), scores
every method of the evaluation (`evaluation.methods(family)`: METHODS for regression) on the same held-out
tasks as training's evaluations (the first N of them: task i is drawn from fold_in(eval_key, i)), prints a
table and writes `DIR/eval/step_<S>.json` (mean and 95% CI of each of the family's metrics per method) with
the figures `DIR/eval/step_<S>_<name>.png`.

With `--shots=5,10,20 [--budgets=0,1,2,5,10,20]` it writes the K-shot curves instead (`studies.kshot_curves`):
held-out metric against K support points and inner iteration budget, every baseline at each K, as
`DIR/eval/kshot_step_<S>.json`, `.md` (the table) and `.png` (the figure).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags, logging

from trainer import checkpointing, evaluation, families, monitoring, omniglot, runs, studies
from trainer import config as config_lib
from trainer import figures as figures_lib
from trainer import mapping as mapping_lib
from trainer import workdir as workdir_lib

DESCRIPTIONS = {
    "adapted": "inner solve from the meta-learned theta (iMAML)",
    "prior": "theta itself, no adaptation",
    "zero": "predict 0",
    "chance": "guess a class uniformly",
    "scratch_prox": "inner solve with the same lambda around a random init",
    "scratch": "lambda = 0 fit from a random init (no meta-learning)",
}


def format_table(record: dict[str, Any]) -> str:
    """The held-out metrics of every method, one row each: mean and 95% CI of each metric."""
    metrics = record["metric_names"]
    lines = [
        f"held-out query metrics at step {record['step']} over {record['num_tasks']} tasks "
        "(mean and 95% CI):",
        f"  {'method':<13}" + "".join(f" {m:>11} {'95% CI':>9}" for m in metrics) + "  description",
    ]
    for method, values in record["methods"].items():
        cells = "".join(f" {values[m]['mean']:>11.5g} {values[m]['ci95']:>9.2g}" for m in metrics)
        lines.append(f"  {method:<13}{cells}  {values['description']}")
    summary = record["summary"]
    lines.append(f"  inner solves of 'adapted' converged: {summary['eval/inner_converged_fraction']:.1%}")
    return "\n".join(lines)


def evaluate_workdir(
    workdir: str, *, step: int | str | None = None, num_tasks: int | None = None
) -> dict[str, Any]:
    """Evaluates a checkpoint of `workdir`; writes `eval/step_<S>.json` and figures; returns the record."""
    config, family, model, meta_params, step = runs.load_run(workdir, step, num_tasks)
    evaluator = evaluation.Evaluator(
        config, model, families.split_keys(config.seed)["eval"], family, mapping_lib.task_mapping(config)
    )
    summary, outputs = evaluator(meta_params)
    metric_names = tuple(evaluator.family.metric_names)

    out_dir = os.path.join(workdir, "eval")
    records = monitoring.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    records = [r for r in records if r["step"] <= step]
    series = {name: monitoring.metric_series(records, name) for name in ("grad_norm", "query_loss")}
    figure_paths = [
        figures_lib.save_png(figures_lib.render(fig), os.path.join(out_dir, f"step_{step}_{name}.png"))
        for name, fig in figures_lib.evaluation_figures(model, config, meta_params, outputs, series).items()
    ]

    record = {
        "step": step,
        "workdir": os.path.abspath(workdir),
        "num_tasks": int(summary["eval/num_tasks"]),
        "family": config.tasks.family,
        "metric_names": list(metric_names),  # Of the query set of each held-out task; the first is reported.
        "methods": {
            m: {
                "description": DESCRIPTIONS.get(m, ""),
                **{
                    metric: {
                        "mean": summary[f"eval/{m}_{metric}"],
                        "ci95": summary[f"eval/{m}_{metric}_ci95"],
                    }
                    for metric in metric_names
                },
            }
            for m in evaluator.methods
        },
        "inner_converged_fraction": summary["eval/inner_converged_fraction"],
        "figures": figure_paths,
        "summary": summary,
    }
    path = os.path.join(out_dir, f"step_{step}.json")
    workdir_lib.write_atomically(path, lambda f: f.write(json.dumps(record, indent=2).encode()))
    record["path"] = path
    return record


def kshot_workdir(
    workdir: str,
    shots: list[int],
    budgets: list[int],
    *,
    step: int | str | None = None,
    num_tasks: int | None = None,
) -> dict[str, Any]:
    """K-shot curves of a checkpoint of `workdir` (`studies.kshot_curves`), written to eval/kshot_step_<S>.*."""
    config, family, _, meta_params, step = runs.load_run(workdir, step, num_tasks)
    record = studies.kshot_curves(
        config,
        meta_params,
        families.split_keys(config.seed)["eval"],
        family,
        mapping_lib.task_mapping(config),
        shots,
        budgets,
    )
    record.update(step=step, workdir=os.path.abspath(workdir))
    table = studies.kshot_table(record)
    stem = os.path.join(workdir, "eval", f"kshot_step_{step}")
    record["paths"] = studies.write_record(record, stem, table, studies.kshot_figure(record))
    record["table"] = table
    return record


def _ints(values: list[str] | None, name: str) -> list[int] | None:
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except ValueError:
        raise runs.RunError(f"--{name} expects comma-separated integers, got {','.join(values)}") from None


def _step(value: str | None) -> int | str | None:
    if value is None or value == "best":
        return value
    if not value.isdigit():
        raise runs.RunError(f'--step={value}: expected a step number or "best"')
    return int(value)


def define_flags() -> None:
    """Defined on use, not at import: tests import this module beside trainer.main (same flag names)."""
    flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).")
    flags.DEFINE_integer("num_tasks", None, "Held-out tasks to evaluate on (default: eval.num_tasks).")
    flags.DEFINE_string(
        "step", None, 'Checkpoint step to evaluate (default: the latest; "best": by checkpoint.best_metric).'
    )
    flags.DEFINE_list(
        "shots", None, "K-shot curves for these numbers of support points (regression), e.g. 5,10,20."
    )
    flags.DEFINE_list(
        "budgets", ["0", "1", "2", "5", "10", "20"], "Inner iteration budgets of the K-shot curves."
    )
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO.
    FLAGS = flags.FLAGS
    try:
        step = _step(FLAGS.step)
        shots = _ints(FLAGS.shots, "shots")
        if shots is not None:
            budgets = _ints(FLAGS.budgets, "budgets")
            record = kshot_workdir(FLAGS.workdir, shots, budgets, step=step, num_tasks=FLAGS.num_tasks)
        else:
            record = evaluate_workdir(FLAGS.workdir, step=step, num_tasks=FLAGS.num_tasks)
    except (
        runs.RunError,
        config_lib.ConfigError,
        checkpointing.CheckpointError,
        omniglot.OmniglotError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # A full, read-only or forbidden disk is one line; anything else a bug.
        message = workdir_lib.environment_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    if shots is not None:
        print(record["table"])
        for path in record["paths"]:
            print(f"wrote {path}")
        return 0
    print(format_table(record))
    print(f"wrote {record['path']}")
    for path in record["figures"]:
        print(f"wrote {path}")
    return 0


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
