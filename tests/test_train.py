"""End to end: the CLI writes metrics.jsonl, and a short run actually meta-learns."""

import json
import time

import jax
import numpy as np
import pytest

from configs import sinusoid
from tests import helpers
from trainer import config as config_lib
from trainer import evaluation, families, train
from trainer import model as model_lib


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
    keys = families.split_keys(config.seed)
    before, _ = evaluation.Evaluator(config, model, keys["eval"], families.get_family(config), "map")(
        model_lib.init_params(model, keys["init"])
    )
    result = train.train_and_evaluate(config, str(tmp_path / "w"))
    after = result.eval_summary
    print("before", before["eval/adapted_mse"], "after", after["eval/adapted_mse"], after)
    assert after["eval/adapted_mse"] < 0.7 * before["eval/adapted_mse"]
    assert after["eval/adapted_mse"] < after["eval/scratch_mse"]
    assert after["eval/adapted_mse"] < after["eval/scratch_prox_mse"]
    losses = np.array([h["query_loss"] for h in result.history])
    assert losses[-10:].mean() < losses[:10].mean()


def test_step_clock_counts_each_step_once(monkeypatch):
    """Steps dispatched ahead overlap on the host's clock, not on the device: each is counted from when the
    previous one finished (or from its dispatch, after a pause)."""
    now = iter([1.0, 2.0, 6.0])
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(now))
    clock = train.StepClock()
    assert clock.finished(dispatched=0.0) == 1.0  # dispatched at 0, ready at 1
    assert clock.finished(dispatched=0.1) == 1.0  # dispatched while the first ran: starts at 1, ready at 2
    assert clock.finished(dispatched=5.0) == 1.0  # dispatched after a pause (evaluation): from 5 to 6


def test_logged_step_times_add_up_to_the_loop_time(tmp_path, monkeypatch):
    """Each step takes >= 0.3 s (a sleep after it finishes); the logged times must add up to the time the
    steps took, not to twice it (a clock that spans two steps)."""
    spans = []
    real = train.executables.train_step_for_run

    def slowed(*args, **kwargs):
        step, source, seconds = real(*args, **kwargs)

        def slow_step(state, batch):
            started = time.perf_counter()
            out = jax.block_until_ready(step(state, batch))
            time.sleep(0.3)
            spans.append((started, time.perf_counter()))
            return out

        return slow_step, source, seconds

    monkeypatch.setattr(train.executables, "train_step_for_run", slowed)
    config = helpers.small_config(
        **{"train.num_steps": 8, "checkpoint.every_steps": 0, "logging.every_steps": 1, "eval.num_tasks": 4}
    )
    result = train.train_and_evaluate(config, str(tmp_path / "w"))
    step_times = [float(h["step_time_s"]) for h in result.history]
    loop_time = spans[-1][1] - spans[0][0]
    print(f"sum of logged step times {sum(step_times):.3f} s; the steps took {loop_time:.3f} s")
    assert len(step_times) == 8 and min(step_times) > 0
    assert 8 * 0.3 <= sum(step_times) <= loop_time + 0.05
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_time_s"] for r in records] == step_times


@pytest.mark.slow
def test_default_config_shortened_beats_every_baseline(tmp_path):
    """configs/sinusoid.py (make train's) at 300 of its 1000 steps: the adapted held-out MSE is below the
    prior's, the zero predictor's and the proximal fit from scratch's with non-overlapping 95% intervals,
    and below the unregularised fit's (whose spread over tasks is wide); no task is dropped."""
    config = config_lib.with_fields(
        sinusoid.get_config(),
        {
            "train.num_steps": 300,
            "eval.every_steps": 0,
            "eval.num_tasks": 200,
            "checkpoint.every_steps": 0,
            "logging.every_steps": 100,
        },
    )
    result = train.train_and_evaluate(config, str(tmp_path / "w"))
    summary = result.eval_summary
    print({k: round(float(v), 4) for k, v in summary.items() if k.endswith("_mse") or k.endswith("_ci95")})
    adapted_high = summary["eval/adapted_mse"] + summary["eval/adapted_mse_ci95"]
    for baseline in ("prior", "zero", "scratch_prox"):
        low = summary[f"eval/{baseline}_mse"] - summary[f"eval/{baseline}_mse_ci95"]
        assert adapted_high < low, baseline
    assert summary["eval/adapted_mse"] < summary["eval/scratch_mse"]
    assert sum(int(h["inner_dropped_tasks"]) for h in result.history) == 0
