"""K-shot curves, the hyper-parameter sweep, and the baselines' construction (issue: learning quality)."""

from __future__ import annotations

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import omniglot as omniglot_configs
from tests import helpers
from tests.test_evaluate import run_evaluate_cli, saved_run  # noqa: F401  (a fixture)
from trainer import config as config_lib
from trainer import evaluation, executables, studies, sweep
from trainer import families as families_lib
from trainer import model as model_lib


def test_zero_predictor_mse_is_its_analytic_value():
    """Query points evenly spaced over whole periods: mean(A^2 sin^2) = A^2 / 2 exactly."""
    family = families_lib.get_family(helpers.small_config())
    amplitude, phase, n = 1.7, 0.3, 40
    x = jnp.linspace(0.0, 4 * math.pi, n, endpoint=False)[:, None]  # Two periods of sin(x + phase).
    task = dict(query_x=x, query_y=amplitude * jnp.sin(x + phase))
    np.testing.assert_allclose(family.baseline(task)["mse"], amplitude**2 / 2, rtol=1e-12)


def test_every_method_is_scored_on_the_same_tasks():
    """Recomputed by hand from the evaluator's own tasks and solutions: adapted, prior and zero agree."""
    config = helpers.small_config(**{"eval.num_tasks": 5})
    executables.configure_jax(config)
    model = model_lib.make_model(config)
    keys = families_lib.split_keys(config.seed)
    meta_params = model_lib.init_params(model, keys["init"])
    summary, outputs = evaluation.Evaluator(
        config, model, keys["eval"], families_lib.get_family(config), "map"
    )(meta_params)
    tasks, per_task = outputs["tasks"], outputs["per_task"]
    for i in range(5):
        qx, qy = tasks["query_x"][i], tasks["query_y"][i]
        adapted = jax.tree.map(lambda a, i=i: a[i], outputs["adapted"])
        np.testing.assert_allclose(per_task["adapted_mse"][i], model_lib.mse_loss(model, adapted, qx, qy))
        np.testing.assert_allclose(per_task["prior_mse"][i], model_lib.mse_loss(model, meta_params, qx, qy))
        np.testing.assert_allclose(per_task["zero_mse"][i], np.mean(qy**2))
    assert summary["eval/num_tasks"] == 5


def test_kshot_curves_cli_on_a_saved_run(saved_run):  # noqa: F811
    workdir, config, _, _ = saved_run
    full = config.inner.maxiter
    proc = run_evaluate_cli([f"--workdir={workdir}", "--shots=2,5", f"--budgets=0,3,{full}", "--num_tasks=4"])
    assert proc.returncode == 0, proc.stderr
    assert "| K |" in proc.stdout
    stem = os.path.join(workdir, "eval", "kshot_step_4")
    for suffix in (".json", ".md", ".png"):
        assert os.path.getsize(stem + suffix) > 0
    record = json.load(open(stem + ".json"))
    assert [row["shots"] for row in record["rows"]] == [2, 5]
    for row in record["rows"]:
        budgets, methods = row["budgets"], row["methods"]
        assert set(methods) == {"adapted", "prior", "zero", "scratch_prox", "scratch"}
        # Budget 0 is the prior; the full budget, solved by a separate program, is the evaluation's adapted
        # result: the same tasks by construction.
        assert budgets["0"] == methods["prior"]
        np.testing.assert_allclose(budgets[str(full)]["mean"], methods["adapted"]["mean"], rtol=1e-9)
    # More support points: the K=5 tasks' support sets differ from the K=2 ones, the query sets do not.
    zero = [row["methods"]["zero"]["mean"] for row in record["rows"]]
    np.testing.assert_allclose(zero[0], zero[1], rtol=1e-12)


def test_kshot_curves_of_an_imported_regression_family():
    """An imported family (examples/polynomial.py) gets K-shot curves like sinusoid: its tasks take their
    support size from tasks.num_support, and the query sets (so the zero baseline) do not change with K."""
    config = config_lib.with_fields(
        config_lib.family_config("examples.polynomial:Polynomial"),
        {"model.hidden_sizes": (8,), "inner.maxiter": 20, "inner.tol": 1e-6, "model.dtype": "float64"},
    )
    family = families_lib.get_family(config)
    meta_params = model_lib.init_params(family.make_model(config), jax.random.key(0))
    record = studies.kshot_curves(
        config, meta_params, jax.random.key(1), family, "map", shots=(2, 4), budgets=(0,), num_tasks=2
    )
    assert [row["shots"] for row in record["rows"]] == [2, 4] and record["metric"] == "mse"
    zero = [row["methods"]["zero"]["mean"] for row in record["rows"]]
    np.testing.assert_allclose(zero[0], zero[1], rtol=1e-12)
    assert all(row["budgets"]["0"] == row["methods"]["prior"] for row in record["rows"])


def test_kshot_curves_refuse_classification():
    config = omniglot_configs.get_config("ways=5,shots=1")
    with pytest.raises(config_lib.ConfigError, match="tasks.family"):
        studies.kshot_curves(
            config, None, jax.random.key(0), families_lib.get_family(config), "map", shots=(1,)
        )


def test_sweep_trains_each_value_and_picks_the_best(tmp_path):
    config = helpers.small_config(**{"train.num_steps": 2, "eval.num_tasks": 4})
    record = studies.sweep(config, str(tmp_path), "inner.l2reg", [0.5, 2.0])
    assert [row["value"] for row in record["rows"]] == [0.5, 2.0]
    for row in record["rows"]:
        assert os.path.exists(os.path.join(row["workdir"], "metrics.jsonl"))
        assert json.load(open(os.path.join(row["workdir"], "config.json")))["inner"]["l2reg"] == row["value"]
        assert row["methods"]["adapted"]["mean"] > 0 and row["num_tasks"] == 4
    adapted = {row["value"]: row["methods"]["adapted"]["mean"] for row in record["rows"]}
    assert record["best_value"] == min(adapted, key=adapted.get)
    assert "| inner.l2reg |" in studies.sweep_table(record)
    # Rerun: both runs are finished; their final evaluations are read back, not recomputed.
    again = studies.sweep(config, str(tmp_path), "inner.l2reg", [0.5, 2.0])
    assert [r["methods"] for r in again["rows"]] == [r["methods"] for r in record["rows"]]


def test_sweep_rejects_bad_fields_and_values_before_training(tmp_path):
    config = helpers.small_config()

    def never(config, workdir):
        raise AssertionError("trained despite an invalid sweep")

    with pytest.raises(config_lib.ConfigError, match="inner.l2regg"):
        studies.sweep(config, str(tmp_path), "inner.l2regg", [1.0], train_fn=never)
    with pytest.raises(config_lib.ConfigError, match="inner.l2reg"):
        studies.sweep(config, str(tmp_path), "inner.l2reg", [1.0, -1.0], train_fn=never)
    with pytest.raises(config_lib.ConfigError, match="'abc' is not a valid float"):
        sweep.parse_values(config, "inner.l2reg", ["0.1", "abc"])
    assert sweep.parse_values(config, "inner.maxiter", ["5", "10"]) == [5, 10]
    with pytest.raises(config_lib.ConfigError, match="'inner' is not a config field"):
        studies.sweep(config, str(tmp_path), "inner", [1.0], train_fn=never)
    assert os.listdir(tmp_path) == []


def test_sweep_over_an_imported_familys_field(tmp_path):
    """tasks.options.<name> of an imported family (examples/polynomial.py) is a sweepable field."""
    config = config_lib.family_config("examples.polynomial:Polynomial")
    assert sweep.parse_values(config, "tasks.options.degree", ["1", "2"]) == [1, 2]
    seen = []
    metrics = {
        f"eval/{m}_mse{s}": 1.0
        for m in evaluation.methods(families_lib.get_family(config))
        for s in ("", "_ci95")
    }

    def fake_train(run_config, workdir):
        seen.append((run_config.tasks.options.degree, os.path.basename(workdir)))
        return types.SimpleNamespace(eval_summary=metrics)

    record = studies.sweep(config, str(tmp_path), "tasks.options.degree", [1, 2], train_fn=fake_train)
    assert seen == [(1, "degree_1"), (2, "degree_2")]
    assert [row["value"] for row in record["rows"]] == [1, 2]
