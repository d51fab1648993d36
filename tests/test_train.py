"""End to end: the CLI writes metrics.jsonl, and a short run actually meta-learns."""

import json

import numpy as np

from tests import helpers
from trainer import evaluation, train
from trainer import model as model_lib
from trainer import tasks as tasks_lib


def test_smoke_config_through_cli_writes_metrics(tmp_path):
    workdir = tmp_path / "smoke"
    proc = helpers.run_cli(["--config=configs/smoke.py", f"--workdir={workdir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    train_keys = {
        "query_loss",
        "support_loss",
        "grad_norm",
        "param_norm",
        "update_norm",
        "inner_iterations_mean",
        "inner_iterations_max",
        "inner_residual_mean",
        "inner_residual_max",
        "inner_converged_fraction",
    }
    assert train_keys <= set(records[0])
    last = records[-1]
    assert {"eval/adapted_mse", "eval/adapted_mse_ci95", "eval/scratch_mse"} <= set(last)
    assert "held-out query MSE" in proc.stdout
    assert (workdir / "config.json").exists()


def test_short_run_meta_learns(tmp_path):
    """The adapted held-out MSE improves over training and beats both from-scratch baselines."""
    config = helpers.small_config(
        **{
            "train.num_steps": 40,
            "train.meta_batch_size": 16,
            "eval.num_tasks": 50,
            "checkpoint.every_steps": 0,
            "logging.every_steps": 20,
        }
    )
    model = model_lib.make_model(config)
    keys = tasks_lib.split_keys(config.seed)
    before, _ = evaluation.Evaluator(config, model, keys["eval"])(model_lib.init_params(model, keys["init"]))
    result = train.train_and_evaluate(config, str(tmp_path / "w"))
    after = result.eval_summary
    print("before", before["eval/adapted_mse"], "after", after["eval/adapted_mse"], after)
    assert after["eval/adapted_mse"] < 0.7 * before["eval/adapted_mse"]
    assert after["eval/adapted_mse"] < after["eval/scratch_mse"]
    assert after["eval/adapted_mse"] < after["eval/scratch_prox_mse"]
    losses = np.array([h["query_loss"] for h in result.history])
    assert losses[-10:].mean() < losses[:10].mean()
