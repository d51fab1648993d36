"""`trainer.evaluate`: restores a run's checkpoint and writes held-out metrics and figures.

The end-to-end check on a run that really trained is in test_monitoring.py (it shares that run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

from tests import helpers
from trainer import checkpointing, evaluate, evaluation, executables, families, optim, runs
from trainer import config as config_lib
from trainer import model as model_lib
from trainer import train_step as train_step_lib


def run_evaluate_cli(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m trainer.evaluate ARGS` with this session's devices and compile cache (so no recompile)."""
    env = dict(os.environ, PYTHONPATH=helpers.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", *args],
        cwd=helpers.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir as training leaves it, without the cost of compiling a train step: config.json and
    checkpoints of steps 2 and 4 (meta-parameters moved away from the init so that the steps differ)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = helpers.small_config()
    executables.configure_jax(config)
    model = model_lib.make_model(config)
    keys = families.split_keys(config.seed)
    optimizer, _ = optim.make_optimizer(config)
    checkpointing.write_config(workdir, config)
    checkpointer = checkpointing.Checkpointer(workdir, config)
    params = {}
    for step in (2, 4):
        meta_params = jax.tree.map(
            lambda p, s=step: np.asarray(p) * (1.0 + 0.1 * s), model_lib.init_params(model, keys["init"])
        )
        state = train_step_lib.create_train_state(meta_params, optimizer, keys["train"])
        checkpointer.save(step, jax.tree.map(np.asarray, state.replace(step=np.int32(step))))
        params[step] = meta_params
    checkpointer.close()
    return workdir, config, model, params


def test_latest_checkpoint_matches_a_direct_evaluation(saved_run):
    workdir, config, model, params = saved_run
    record = evaluate.evaluate_workdir(workdir)
    assert record["step"] == 4 and record["path"] == os.path.join(workdir, "eval", "step_4.json")
    with open(record["path"]) as f:
        saved = json.load(f)
    assert list(saved["methods"]) == list(evaluation.METHODS) and saved["metric_names"] == ["mse"]
    # Reference: the evaluator run on the in-memory parameters, without config.json or the checkpoint.
    reference, _ = evaluation.Evaluator(
        config, model, families.split_keys(config.seed)["eval"], families.get_family(config), "map"
    )(params[4])
    for method in evaluation.METHODS:
        np.testing.assert_allclose(
            saved["methods"][method]["mse"]["mean"],
            reference[f"eval/{method}_mse"],
            rtol=1e-10,
            err_msg=method,
        )
        np.testing.assert_allclose(
            saved["methods"][method]["mse"]["ci95"],
            reference[f"eval/{method}_mse_ci95"],
            rtol=1e-10,
            err_msg=method,
        )
    assert saved["num_tasks"] == config.eval.num_tasks
    names = sorted(os.path.basename(p) for p in saved["figures"])
    assert names == ["step_4_predictions.png"]  # No metrics.jsonl here, so no training curves.
    pixels = matplotlib.image.imread(saved["figures"][0])
    assert pixels.shape[0] > 100 and pixels[..., :3].std() > 0.05


def test_cli_given_step(saved_run):
    workdir = saved_run[0]
    proc = run_evaluate_cli([f"--workdir={workdir}", "--step=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in evaluation.METHODS:
        assert f"\n  {method} " in proc.stdout, proc.stdout
    with open(os.path.join(workdir, "eval", "step_2.json")) as f:
        saved = json.load(f)
    assert saved["step"] == 2 and saved["num_tasks"] == 8
    assert os.path.exists(os.path.join(workdir, "eval", "step_2_predictions.png"))
    assert all(np.isfinite(saved["methods"][m]["mse"]["mean"]) for m in evaluation.METHODS)


def test_num_tasks_overrides_the_saved_config(saved_run, monkeypatch):
    class Stop(Exception):
        pass

    seen = {}

    def evaluator(config, model, eval_key, family, task_mapping):
        seen["num_tasks"] = config.eval.num_tasks
        raise Stop  # The wiring is what is tested here; skip compiling an evaluator of another size.

    monkeypatch.setattr(evaluation, "Evaluator", evaluator)
    with pytest.raises(Stop):
        evaluate.evaluate_workdir(saved_run[0], num_tasks=3)
    assert seen["num_tasks"] == 3
    with pytest.raises(runs.RunError, match="--num_tasks must be >= 1"):
        evaluate.evaluate_workdir(saved_run[0], num_tasks=0)


def test_cli_on_an_empty_workdir_fails_clearly(tmp_path):
    proc = run_evaluate_cli([f"--workdir={tmp_path}"])
    assert proc.returncode == 1
    assert "neither checkpoints/ nor config.json" in proc.stderr and "not a training workdir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []  # Nothing written into a directory that is not a run.


def test_missing_checkpoint_or_step_is_a_clear_error(saved_run, tmp_path):
    checkpointing.write_config(str(tmp_path), helpers.small_config())
    with pytest.raises(runs.RunError, match="no checkpoints in"):
        evaluate.evaluate_workdir(str(tmp_path))
    with pytest.raises(runs.RunError, match=r"no checkpoint of step 3 .*steps: \[2, 4\]$"):
        evaluate.evaluate_workdir(saved_run[0], step=3)
    with pytest.raises(runs.RunError, match="does not exist"):
        evaluate.evaluate_workdir(str(tmp_path / "missing"))


def test_the_config_saved_with_the_checkpoint_wins_over_an_edited_config_json(saved_run, tmp_path):
    workdir, config, _, params = saved_run
    edited = str(tmp_path / "edited")
    shutil.copytree(workdir, edited)
    saved = json.load(open(checkpointing.config_path(edited)))
    saved["inner"]["l2reg"], saved["model"]["activation"] = 2.0, "relu"
    json.dump(saved, open(checkpointing.config_path(edited), "w"))
    warnings = []
    loaded, _, _, meta_params, step = runs.load_run(edited, None, None, warn=warnings.append)
    assert step == 4 and config_lib.to_dict(loaded) == config_lib.to_dict(config)
    assert loaded.inner.l2reg == config.inner.l2reg and loaded.model.activation == config.model.activation
    for a, b in zip(jax.tree.leaves(meta_params), jax.tree.leaves(params[4]), strict=True):
        np.testing.assert_array_equal(a, b)
    (warning,) = warnings
    assert "inner.l2reg (config.json 2.0, checkpoint 1.0)" in warning
    assert "model.activation (config.json 'relu', checkpoint" in warning and "2 field(s)" in warning
    os.remove(checkpointing.config_path(edited))  # The checkpoint alone is enough.
    assert config_lib.to_dict(
        runs.load_run(edited, 2, None, warn=warnings.append).config
    ) == config_lib.to_dict(config)


def test_load_config_round_trips_and_names_bad_fields(tmp_path):
    config = helpers.small_config(**{"model.hidden_sizes": (5, 7), "inner.l2reg": 0.5})
    checkpointing.write_config(str(tmp_path), config)
    loaded = runs.load_config(str(tmp_path))
    assert config_lib.to_dict(loaded) == config_lib.to_dict(config)
    assert loaded.model.hidden_sizes == (5, 7)

    saved = config_lib.to_dict(config)
    saved["inner"]["typo_field"] = 1
    with open(checkpointing.config_path(str(tmp_path)), "w") as f:
        json.dump(saved, f)
    with pytest.raises(config_lib.ConfigError, match=r"config.json: .*inner.typo_field"):
        runs.load_config(str(tmp_path))
