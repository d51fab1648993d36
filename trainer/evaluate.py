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

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from trainer import checkpointing, evaluation, families, monitoring, omniglot, optim, studies, train
from trainer import config as config_lib
from trainer import figures as figures_lib
from trainer import mapping as mapping_lib
from trainer import model as model_lib
from trainer import tasks as tasks_lib
from trainer import train_step as train_step_lib
from trainer import workdir as workdir_lib

DESCRIPTIONS = {
    "adapted": "inner solve from the meta-learned theta (iMAML)",
    "prior": "theta itself, no adaptation",
    "zero": "predict 0",
    "chance": "guess a class uniformly",
    "scratch_prox": "inner solve with the same lambda around a random init",
    "scratch": "lambda = 0 fit from a random init (no meta-learning)",
}


class EvaluationError(RuntimeError):
    """The workdir cannot be evaluated: no saved config, no checkpoint, or no such step."""


def _update(node: ml_collections.ConfigDict, saved: dict[str, Any], source: str, prefix: str = "") -> None:
    for key, value in saved.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
            _update(node[key], value, source, name + ".")
            continue
        if isinstance(value, list):
            value = tuple(value)  # JSON has no tuples; the schema's sequences are tuples.
        try:
            node[key] = value  # Unknown keys are added here and reported by validate().
        except (TypeError, ValueError) as e:
            raise config_lib.ConfigError(
                f"{source}: field '{name}' = {value!r} does not fit the schema: {e}"
            ) from e


def config_from_dict(saved: dict[str, Any], source: str) -> ml_collections.ConfigDict:
    """`default_config()` updated with a saved config (`source` names it in errors), then validated."""
    config = config_lib.default_config()
    _update(config, saved, source)
    try:
        return config_lib.validate(config)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{source}: {e}") from e


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of `DIR/config.json` (the last run's, for reading; evaluation uses the checkpoint's)."""
    path = checkpointing.config_path(workdir)
    saved = checkpointing.read_config(workdir)
    if saved is None:
        raise EvaluationError(
            f"{path} does not exist: {workdir} is not a training workdir "
            "(train writes config.json when a run starts)"
        )
    return config_from_dict(saved, path)


def _checkpoint_config(
    workdir: str, reader: checkpointing.Checkpointer, step: int, warn
) -> ml_collections.ConfigDict:
    """The config saved with checkpoint `step`, the source of truth for its meta-parameters.

    A `config.json` that differs from it is reported (`warn`) and not used; a checkpoint written without
    a config (none of this trainer's) falls back to config.json.
    """
    saved = reader.saved_meta(step).get("config")
    path = checkpointing.config_path(workdir)
    if saved is None:
        warn(f"warning: checkpoint step {step} holds no config; using {path}")
        return load_config(workdir)
    on_disk = checkpointing.read_config(workdir)
    differing = checkpointing.differing_fields(on_disk, saved) if on_disk is not None else []
    if differing:
        fields = "; ".join(f"{name} (config.json {a!r}, checkpoint {b!r})" for name, a, b in differing)
        warn(
            f"warning: {path} differs from the config saved with checkpoint step {step} in "
            f"{len(differing)} field(s): {fields}; evaluating with the checkpoint's config"
        )
    return config_from_dict(saved, f"the config of checkpoint step {step} in {reader.directory}")


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_run(
    workdir: str, step: int | str | None, num_tasks: int | None, warn=_warn
) -> tuple[ml_collections.ConfigDict, Any, Any, int]:
    """The config saved with checkpoint `step` (the latest when None, the best by the run's
    checkpoint.best_metric when "best"; eval.num_tasks = num_tasks if given), its model, and its
    meta-parameters."""
    if not os.path.isdir(workdir):
        raise EvaluationError(f"workdir {workdir} does not exist")
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        if checkpointing.read_config(workdir) is None:
            raise EvaluationError(
                f"{workdir} is not a training workdir: it has neither checkpoints/ nor config.json "
                "(training writes both)"
            )
        raise EvaluationError(f"no checkpoints in {workdir}: {directory} does not exist")
    if num_tasks is not None and num_tasks < 1:
        raise EvaluationError(f"--num_tasks must be >= 1, got {num_tasks}")
    with checkpointing.Checkpointer(workdir) as reader:
        steps = reader.all_steps()
        if not steps:
            raise EvaluationError(
                f"no checkpoints in {directory} (training saves one every checkpoint.every_steps and at the end)"
            )
        if step == "best":
            latest = reader.saved_meta(max(steps)).get("config") or {}
            best = latest.get("checkpoint", {})
            if not best.get("best_metric"):
                raise EvaluationError(
                    f"--step=best: the run in {workdir} kept no best checkpoint (its checkpoint.best_metric "
                    "is empty); give a step number"
                )
            step = reader.best_step(best["best_metric"], best.get("best_mode", "min"))
            warn(f"--step=best: step {step}, the best {best['best_metric']} ({best.get('best_mode', 'min')})")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise EvaluationError(f"no checkpoint of step {step} in {directory}; available steps: {steps}")
        config = _checkpoint_config(workdir, reader, step, warn)
        if num_tasks is not None:
            config.eval.num_tasks = num_tasks
        train.configure_jax(config)
        model = families.get_family(config).make_model(config)
        keys = tasks_lib.split_keys(config.seed)
        optimizer, _ = optim.make_optimizer(config)
        template = jax.tree.map(
            np.asarray,
            train_step_lib.create_train_state(
                model_lib.init_params(model, keys["init"]), optimizer, keys["train"]
            ),
        )
        host_state = reader.restore(step, template)
    return config, model, host_state.meta_params, int(step)


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
    config, model, meta_params, step = load_run(workdir, step, num_tasks)
    family = families.get_family(config)
    evaluator = evaluation.Evaluator(
        config, model, tasks_lib.split_keys(config.seed)["eval"], family, mapping_lib.task_mapping(config)
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
    config, _, meta_params, step = load_run(workdir, step, num_tasks)
    record = studies.kshot_curves(
        config,
        meta_params,
        tasks_lib.split_keys(config.seed)["eval"],
        families.get_family(config),
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
        raise EvaluationError(f"--{name} expects comma-separated integers, got {','.join(values)}") from None


def _step(value: str | None) -> int | str | None:
    if value is None or value == "best":
        return value
    if not value.isdigit():
        raise EvaluationError(f'--step={value}: expected a step number or "best"')
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
        EvaluationError,
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
