"""Monitoring: TensorBoard event files read back, figures, the progress bar, and NaN stopping the run."""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests import helpers
from trainer import evaluate, evaluation, monitoring, parallel, train

NUM_STEPS = 4
TRAIN_TAGS = (
    "train/query_loss",
    "train/support_loss",
    "train/grad_norm",
    "train/param_norm",
    "train/update_norm",
    "train/learning_rate",
    "inner/iterations_mean",
    "inner/iterations_max",
    "inner/residual_mean",
    "inner/residual_max",
    "inner/converged_fraction",
    "inner/nonconverged_tasks",
    "inner/diverged_tasks",
    "perf/step_time_s",
    "perf/tasks_per_s",
)
EVAL_TAGS = tuple(
    f"eval/{m}_mse{s}" for m in ("adapted", "prior", "zero", "scratch_prox", "scratch") for s in ("", "_ci95")
) + ("eval/inner_converged_fraction", "perf/eval_time_s")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the small config, logged every step, evaluated at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = helpers.small_config(**{"train.num_steps": NUM_STEPS, "eval.every_steps": 2})
    result = train.train_and_evaluate(config, workdir)
    events = EventAccumulator(
        monitoring.tensorboard_dir(workdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    events.Reload()
    return workdir, config, result, events


def _scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_training_scalars_are_written_every_step_and_finite(trained):
    _, _, result, events = trained
    tags = set(events.Tags()["scalars"])
    missing = sorted(set(TRAIN_TAGS) - tags)
    assert not missing, f"missing scalar tags {missing}; written: {sorted(tags)}"
    for tag in TRAIN_TAGS:
        steps, values = zip(*_scalars(events, tag), strict=True)
        assert list(steps) == list(range(1, NUM_STEPS + 1)), tag
        assert np.all(np.isfinite(values)), tag
    # The event files hold the values the loop computed (scalars are stored as float32).
    logged = [v for _, v in _scalars(events, "train/query_loss")]
    np.testing.assert_allclose(logged, [float(h["query_loss"]) for h in result.history], rtol=1e-6)
    fractions = [v for _, v in _scalars(events, "inner/converged_fraction")]
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_first_step_compile_time_and_eval_scalars(trained):
    _, _, result, events = trained
    ((compile_step, compile_s),) = _scalars(events, "perf/compile_time_s")
    ((_, first_step_s),) = _scalars(events, "perf/first_step_time_s")
    assert compile_step == 1
    assert 0.0 < compile_s  # Tracing is timed even when the persistent cache holds the executable.
    assert compile_s <= first_step_s  # Compiling is part of the first step's wall time.
    for tag in EVAL_TAGS:
        steps, values = zip(*_scalars(events, tag), strict=True)
        assert list(steps) == [2, NUM_STEPS], tag
        assert np.all(np.isfinite(values)), tag
    (_, final_adapted) = _scalars(events, "eval/adapted_mse")[-1]
    np.testing.assert_allclose(final_adapted, result.eval_summary["eval/adapted_mse"], rtol=1e-6)


def test_config_text_hparams_and_figures_in_tensorboard(trained):
    workdir, config, _, events = trained
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    shown_config = json.loads("\n".join(line[4:] for line in text.splitlines()))
    assert shown_config["inner"]["l2reg"] == config.inner.l2reg
    assert set(events.PluginTagToContent("hparams")) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    shown = set(start.hparams)
    assert {"inner.l2reg", "model.hidden_sizes", "train.meta_batch_size", "train.num_steps"} <= shown
    assert not shown & {"checkpoint.async_save", "compile_cache_dir", "logging.every_steps", "tasks.data_dir"}
    assert start.hparams["inner.l2reg"].number_value == config.inner.l2reg
    for tag in ("figures/predictions", "figures/training"):
        images = events.Images(tag)
        assert [im.step for im in images] == [2, NUM_STEPS], tag
        assert images[0].width > 100 and images[0].height > 100


def test_figures_are_saved_as_png(trained):
    workdir = trained[0]
    for name in ("predictions", "training"):
        for step in (2, NUM_STEPS):
            path = os.path.join(monitoring.figures_dir(workdir), f"{name}_step_{step}.png")
            pixels = matplotlib.image.imread(path)
            assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, path
            assert pixels[..., :3].std() > 0.05, f"{path} is blank"


def test_evaluate_on_the_trained_run_reproduces_its_last_evaluation(trained):
    """`trainer.evaluate` on this short trained run: JSON, PNGs, and the numbers training logged last."""
    workdir, _, result, _ = trained
    record = evaluate.evaluate_workdir(workdir)
    with open(os.path.join(workdir, "eval", f"step_{NUM_STEPS}.json")) as f:
        saved = json.load(f)
    assert saved["step"] == NUM_STEPS
    for method in evaluation.METHODS:  # Same tasks, same random inits, restored parameters.
        np.testing.assert_allclose(
            saved["methods"][method]["mse"]["mean"],
            result.eval_summary[f"eval/{method}_mse"],
            rtol=1e-10,
            err_msg=method,
        )
    assert sorted(os.path.basename(p) for p in record["figures"]) == [
        f"step_{NUM_STEPS}_predictions.png",
        f"step_{NUM_STEPS}_training.png",
    ]
    assert all(matplotlib.image.imread(p)[..., :3].std() > 0.05 for p in record["figures"])


@pytest.mark.parametrize("policy", ["unusable", "none"])
def test_planted_nan_is_dropped_or_stops_the_run_naming_step_and_quantity(tmp_path, monkeypatch, policy):
    """NaN support targets in one task of step 3 flow through the real jitted step: by default the task is
    dropped (counted, the run goes on); with meta_grad.drop_tasks=none they stop the run."""
    make_backend = parallel.make_backend

    def backend_with_nan(*args, **kwargs):
        backend = make_backend(*args, **kwargs)
        sample = backend.sample_tasks

        def sample_tasks(task_key, step):
            batch = sample(task_key, step)
            if step == 2:  # The third step: done_step 3.
                batch = dict(batch, support_y=batch["support_y"].at[0].set(jnp.nan))
            return batch

        backend.sample_tasks = sample_tasks
        return backend

    monkeypatch.setattr(parallel, "make_backend", backend_with_nan)
    config = helpers.small_config(
        **{"train.num_steps": NUM_STEPS, "eval.every_steps": 0, "meta_grad.drop_tasks": policy}
    )
    if policy == "none":
        with pytest.raises(
            train.NonFiniteError, match=r"^step 3: support_loss is nan; 1 of 8 tasks diverged"
        ):
            train.train_and_evaluate(config, str(tmp_path))
    else:
        result = train.train_and_evaluate(config, str(tmp_path))
        assert [int(h["inner_dropped_tasks"]) for h in result.history][2] >= 1
        assert int(result.history[2]["inner_diverged_tasks"]) == 1
    logged_steps = [r["step"] for r in monitoring.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))]
    assert logged_steps == ([1, 2] if policy == "none" else list(range(1, NUM_STEPS + 1)))


def test_check_finite_names_the_bad_quantity(small_config):
    metrics = dict(
        query_loss=np.float64(0.1),
        support_loss=np.float64(0.2),
        grad_norm=np.float64(np.inf),
        param_norm=np.float64(1.0),
        update_norm=np.float64(0.0),
        inner_residual_max=np.float64(3),
        inner_nonconverged_tasks=np.float32(2),
        inner_diverged_tasks=np.float32(1),
    )
    expected = r"^step 7: grad_norm is inf; 1 of 8 tasks diverged .*; 2 of 8 inner solves did not converge"
    with pytest.raises(train.NonFiniteError, match=expected):
        train.check_finite(7, metrics, small_config)
    train.check_finite(7, {**metrics, "grad_norm": np.float64(1.0)}, small_config)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(tmp_path):
    terminal = _Terminal()
    writer = monitoring.MetricsWriter(str(tmp_path / "tty"), num_steps=10, tensorboard=False, stream=terminal)
    writer.progress(3, 0.125)
    writer.log("a log line")
    writer.close()
    shown = terminal.getvalue()
    assert "3/10" in shown and "loss=0.125" in shown and "a log line" in shown

    pipe = io.StringIO()
    writer = monitoring.MetricsWriter(str(tmp_path / "pipe"), num_steps=10, tensorboard=False, stream=pipe)
    writer.progress(3, 0.125)
    writer.log("a log line")
    writer.close()
    assert pipe.getvalue() == "a log line\n"


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "other_process"
    stream = _Terminal()
    writer = monitoring.MetricsWriter(str(workdir), enabled=False, num_steps=10, stream=stream)
    writer.write(1, {"query_loss": 1.0})
    writer.write_config(helpers.small_config())
    assert writer.write_figures(1, {"x": None}) == []
    writer.progress(1, 1.0)
    writer.log("hidden")
    writer.close()
    assert not workdir.exists() and stream.getvalue() == ""


def test_compile_timer_counts_only_while_started():
    timer = monitoring.CompileTimer()
    with timer:
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 0.123456)(jnp.ones(3)).block_until_ready()
    inside = timer.seconds
    assert inside > 0.0
    jax.jit(lambda x: jnp.cos(x) * 5.0 - 0.654321)(jnp.ones(3)).block_until_ready()
    assert timer.seconds == inside


def test_tensorboard_tags_group_metrics():
    assert monitoring.tensorboard_tag("inner_residual_max") == "inner/residual_max"
    assert monitoring.tensorboard_tag("compile_time_s") == "perf/compile_time_s"
    assert monitoring.tensorboard_tag("grad_norm") == "train/grad_norm"
    assert monitoring.tensorboard_tag("eval/adapted_mse") == "eval/adapted_mse"
