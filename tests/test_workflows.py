"""Workflows around a run: warm starts (train.init_from), the best checkpoint, and profiler traces."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
import pytest

from tests import helpers
from trainer import checkpointing, evaluate, monitoring, runs, train
from trainer import config as config_lib


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    """Evaluated after every step, keeping the latest checkpoint and the best by eval/adapted_mse."""
    workdir = str(tmp_path_factory.mktemp("best"))
    config = helpers.small_config(
        **{
            "train.num_steps": 5,
            "eval.every_steps": 1,
            "eval.num_tasks": 4,
            "checkpoint.every_steps": 0,
            "checkpoint.max_to_keep": 1,
            "checkpoint.best_metric": "eval/adapted_mse",
        }
    )
    result = train.train_and_evaluate(config, workdir)
    return workdir, config, result


def _eval_history(workdir) -> dict[int, float]:
    records = monitoring.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["eval/adapted_mse"] for r in records if "eval/adapted_mse" in r}


def test_the_best_checkpoint_is_kept_beside_the_latest_and_evaluate_picks_it(best_run):
    workdir, config, _ = best_run
    history = _eval_history(workdir)
    assert sorted(history) == [1, 2, 3, 4, 5]
    best = min(history, key=history.get)
    with checkpointing.Checkpointer(workdir) as reader:
        assert reader.all_steps() == sorted({best, 5})  # max_to_keep=1 latest, plus the best.
        assert reader.best_step("eval/adapted_mse", "min") == best
    messages = []
    step = runs.load_run(workdir, "best", None, warn=messages.append).step
    assert step == best and f"step {best}" in messages[0]
    record = evaluate.evaluate_workdir(workdir, step="best", num_tasks=4)
    np.testing.assert_allclose(record["summary"]["eval/adapted_mse"], history[best], rtol=1e-6)


def test_a_best_metric_the_family_does_not_produce_is_refused_before_compiling(tmp_path):
    config = helpers.small_config(**{"checkpoint.best_metric": "eval/adapted_acc"})
    with pytest.raises(config_lib.ConfigError, match=r"checkpoint.best_metric.*eval/adapted_mse"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_profile_steps_write_a_trace_where_tensorboard_reads_it(tmp_path):
    config = helpers.small_config(**{"train.num_steps": 3})
    train.train_and_evaluate(config, str(tmp_path / "traced"), profile_steps=(1, 2))  # Step 2 only.
    profile_dir = os.path.join(monitoring.tensorboard_dir(str(tmp_path / "traced")), "plugins", "profile")
    (trace,) = glob.glob(os.path.join(profile_dir, "*", "*.xplane.pb"))
    assert os.path.getsize(trace) > 1000
    plain = train.train_and_evaluate(config, str(tmp_path / "plain"))
    assert int(plain.state.step) == 3
    assert not os.path.exists(os.path.join(monitoring.tensorboard_dir(str(tmp_path / "plain")), "plugins"))


def test_a_warm_start_takes_the_source_parameters_with_a_fresh_optimizer(best_run, tmp_path):
    source, _, source_result = best_run
    config = helpers.small_config(**{"train.init_from": f"{source}:5", "outer.learning_rate": 1e-12})
    result = train.train_and_evaluate(config, str(tmp_path / "warm"))
    assert result.history[0]["step"] == 1  # A fresh run: step 0 to 4.
    # With a negligible learning rate the parameters stay the source's final ones (Adam: |update| <= lr).
    for ours, theirs in zip(
        jax.tree.leaves(result.state.meta_params),
        jax.tree.leaves(source_result.state.meta_params),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, atol=1e-9)
    recorded = json.load(open(tmp_path / "warm" / "config.json"))["train"]["init_from"]
    assert recorded == f"{os.path.abspath(source)}:5"


def test_a_warm_start_from_another_architecture_names_the_parameter_and_both_shapes(best_run, tmp_path):
    source, _, _ = best_run
    config = helpers.small_config(**{"train.init_from": source, "model.hidden_sizes": (16, 8)})
    with pytest.raises(
        config_lib.ConfigError,
        match=r"parameter \['params'\]\['layers_0'\]\['bias'\] has shape \(8,\) there and \(16,\)",
    ):
        train.train_and_evaluate(config, str(tmp_path))


def test_cli_flags_for_warm_start_and_profile_are_checked(tmp_path):
    proc = helpers.run_cli(
        ["--config=configs/smoke.py", f"--workdir={tmp_path}", "--profile_steps=5:2"], timeout=120
    )
    assert proc.returncode == 2 and "--profile_steps=5:2: expected START:END" in proc.stderr
    proc = helpers.run_cli(
        ["--config=configs/smoke.py", f"--workdir={tmp_path / 'w'}", f"--init_from={tmp_path / 'missing'}"],
        timeout=120,
    )
    assert proc.returncode == 1 and "train.init_from=" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
