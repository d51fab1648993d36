"""Checkpoints: exact resume, kill -9 and SIGTERM mid-run, damaged checkpoints, config checks, device counts.

Every resumed run is compared with one uninterrupted reference run (float64, CPU): parameters and optimizer
state must be bitwise identical when the device count does not change.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import helpers
from trainer import checkpointing, train
from trainer import config as config_lib

NUM_STEPS = 10


def _config(**overrides):
    """The reference setting: checkpoints at every step, all kept, so any step can be compared."""
    return helpers.small_config(
        **{
            "train.num_steps": NUM_STEPS,
            "checkpoint.every_steps": 1,
            "checkpoint.max_to_keep": NUM_STEPS,
            **overrides,
        }
    )


def _cli_args(workdir, **overrides) -> list[str]:
    """CLI flags giving configs/smoke.py the maths of helpers.small_config (checked in the tests)."""
    fields = {
        "train.num_steps": NUM_STEPS,
        "eval.every_steps": 0,
        "logging.every_steps": 1,
        "checkpoint.every_steps": 1,
        "checkpoint.max_to_keep": NUM_STEPS,
        "parallel.backend": "none",
        **overrides,
    }
    flags = [f"--config.{name}={value}" for name, value in fields.items()]
    return ["--config=configs/smoke.py", f"--workdir={workdir}", *flags]


def _start_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = helpers.REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.main", *args],
        cwd=helpers.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _logged_steps(workdir) -> list[int]:
    """Steps in metrics.jsonl, ignoring a last line still being written."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(json.loads(line)["step"])
            except json.JSONDecodeError:
                pass
    return steps


def _wait_for_logged_step(proc: subprocess.Popen, workdir, step: int, timeout_s: float = 300) -> int:
    """Polls metrics.jsonl until it logs `step` or later while `proc` runs; returns the last logged step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = _logged_steps(workdir)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(
                f"training ended (status {proc.returncode}) before step {step}:\n{proc.stdout.read()}"
            )
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"step {step} not logged within {timeout_s} s:\n{proc.stdout.read()}")


def _restore(workdir, step, template):
    with checkpointing.Checkpointer(str(workdir), _config()) as checkpointer:
        return checkpointer.restore(step, template)


def _saved_steps(workdir) -> list[int]:
    with checkpointing.Checkpointer(str(workdir), _config()) as checkpointer:
        return checkpointer.all_steps()


def _assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


def _assert_each_step_logged_once(workdir, last=NUM_STEPS):
    assert _logged_steps(workdir) == list(range(1, last + 1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of NUM_STEPS steps; its workdir holds a checkpoint of every step."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train.train_and_evaluate(_config(), str(workdir))
    assert jax.tree.leaves(result.state.meta_params)[0].dtype == np.float64
    assert _saved_steps(workdir) == list(range(1, NUM_STEPS + 1))
    return workdir, result.state


def _copy(reference_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_workdir, workdir)
    return workdir


def test_stop_and_resume_is_bitwise_exact_and_keeps_max_to_keep(reference, tmp_path):
    _, reference_state = reference
    # Default checkpoint settings here: every 2 steps, 3 kept.
    config = helpers.small_config(**{"train.num_steps": NUM_STEPS // 2})
    first = train.train_and_evaluate(config, str(tmp_path))
    assert int(first.state.step) == NUM_STEPS // 2
    config.train.num_steps = NUM_STEPS  # Not a maths field (constant learning rate): allowed to change.
    second = train.train_and_evaluate(config, str(tmp_path))

    assert [record["step"] for record in second.history] == list(range(NUM_STEPS // 2 + 1, NUM_STEPS + 1))
    _assert_bitwise_equal(second.state, reference_state)
    _assert_each_step_logged_once(tmp_path)
    assert _saved_steps(tmp_path) == [6, 8, 10]
    assert json.load(open(tmp_path / "config.json"))["train"]["num_steps"] == NUM_STEPS


@pytest.mark.slow
def test_restore_step_resumes_from_an_earlier_step_and_sets_later_ones_aside(reference, tmp_path):
    reference_workdir, reference_state = reference
    workdir = _copy(reference_workdir, tmp_path)
    result = train.train_and_evaluate(_config(), str(workdir), restore_step=7)
    assert [record["step"] for record in result.history] == [8, 9, 10]
    _assert_bitwise_equal(result.state, reference_state)
    _assert_each_step_logged_once(workdir)
    (aside,) = glob.glob(str(workdir / checkpointing.SUPERSEDED_DIR / "*"))
    assert sorted(os.listdir(aside), key=int) == ["8", "9", "10"]  # Moved, not deleted.


def test_kill_9_then_sigterm_then_resume_match_the_uninterrupted_run(reference, tmp_path):
    """Three attempts at one run: killed by SIGKILL, preempted by SIGTERM, finished in-process."""
    reference_workdir, reference_state = reference
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after, delay_s = rng.randint(1, 3), rng.uniform(0.0, 0.2)
    # 1. Asynchronous saves at every step, so SIGKILL lands during a save as often as not.
    proc = _start_cli(_cli_args(tmp_path))
    _wait_for_logged_step(proc, tmp_path, kill_after)
    time.sleep(delay_s)
    proc.kill()
    proc.communicate(timeout=60)
    context = (
        f"seed {seed}: SIGKILL {delay_s:.3f} s after step {kill_after} left "
        f"{sorted(os.listdir(tmp_path / 'checkpoints'))}"
    )
    checkpointer = checkpointing.Checkpointer(str(tmp_path), _config())
    killed_at = checkpointer.latest_step() or 0
    for step in checkpointer.all_steps():  # Every listed step is complete and equals the reference's.
        _assert_bitwise_equal(
            checkpointer.restore(step, reference_state), _restore(reference_workdir, step, reference_state)
        )
    checkpointer.close()

    # 2. The same command resumes; SIGTERM (no periodic checkpoints) saves the step reached and exits 75.
    # metrics.jsonl may still hold steps past the checkpoint from the killed run (the resume drops them):
    # wait for a step beyond those, so that SIGTERM never lands before the resumed run's handler exists.
    stale = max(_logged_steps(tmp_path) or [0])
    proc = _start_cli(_cli_args(tmp_path, **{"train.num_steps": 1000, "checkpoint.every_steps": 0}))
    _wait_for_logged_step(proc, tmp_path, max(killed_at + 2, stale + 1))
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == checkpointing.PREEMPTED_EXIT_STATUS, f"{context}\n{output}"
    assert f"from step {killed_at}" in output, f"{context}\n{output}"
    checkpointer = checkpointing.Checkpointer(str(tmp_path), _config())
    preempted_at = checkpointer.latest_step()
    assert preempted_at == _logged_steps(tmp_path)[-1] > killed_at + 1, context  # The step reached.
    assert f"saved step {preempted_at}" in output
    assert preempted_at < NUM_STEPS, "the run passed the reference's length before handling SIGTERM"
    _assert_bitwise_equal(
        checkpointer.restore(preempted_at, reference_state),
        _restore(reference_workdir, preempted_at, reference_state),
    )
    checkpointer.close()

    # 3. Resumed in-process to the end: identical to the uninterrupted run, each step logged once.
    result = train.train_and_evaluate(_config(), str(tmp_path))
    assert result.history[0]["step"] == preempted_at + 1
    _assert_bitwise_equal(result.state, reference_state)
    _assert_each_step_logged_once(tmp_path)


def test_a_second_run_on_a_held_workdir_is_refused_and_the_first_is_untouched(reference, tmp_path):
    """The issue's reproduction: the same command twice, the second with another lambda."""
    from trainer import workdir

    reference_workdir, reference_state = reference
    first = _start_cli(_cli_args(tmp_path))
    deadline = time.monotonic() + 120
    while workdir.recorded_holder(str(tmp_path)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = _start_cli(_cli_args(tmp_path, **{"inner.l2reg": 2.0}))
    second_output = second.communicate(timeout=300)[0]
    first_output = first.communicate(timeout=300)[0]
    assert first.poll() == 0, first_output  # It was still running when the second one gave up.
    assert second.returncode == 1 and "Traceback" not in second_output, second_output
    assert f"is in use by another run (pid {first.pid} on host" in second_output, second_output
    assert "training" not in second_output  # Refused before doing anything.
    for step in range(1, NUM_STEPS + 1):  # Every checkpoint is the solo run's.
        _assert_bitwise_equal(
            _restore(tmp_path, step, reference_state), _restore(reference_workdir, step, reference_state)
        )
    _assert_each_step_logged_once(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["inner"]["l2reg"] == 1.0
    assert not os.path.exists(tmp_path / workdir.LOCK_NAME)


def test_a_save_killed_midway_is_never_listed_and_can_be_redone(tmp_path):
    """SIGKILL while orbax writes a step in the background leaves only its temporary directory."""
    script = f"""
import sys, time, numpy as np
from tests import helpers
from trainer import checkpointing
checkpointer = checkpointing.Checkpointer({str(tmp_path)!r}, helpers.small_config())
checkpointer.save(1, {{"w": np.arange(3.0)}})
checkpointer.wait()
checkpointer.save(2, {{"w": np.zeros(20_000_000)}})  # 160 MB: about a second of writing.
print("saving", flush=True)
time.sleep(300)
"""
    env = dict(os.environ, PYTHONPATH=helpers.REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "saving"
    proc.kill()
    proc.communicate(timeout=60)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.orbax-checkpoint-tmp"]

    with checkpointing.Checkpointer(str(tmp_path), helpers.small_config()) as checkpointer:
        assert checkpointer.all_steps() == [1] and checkpointer.latest_step() == 1
        with pytest.raises(checkpointing.CheckpointError, match="no complete checkpoint for step 2"):
            checkpointer.restore(2, {"w": np.zeros(3)})
        checkpointer.save(2, {"w": np.ones(3)})  # Orbax replaces the unfinished directory.
    with checkpointing.Checkpointer(str(tmp_path), helpers.small_config()) as checkpointer:
        assert checkpointer.all_steps() == [1, 2]
        np.testing.assert_array_equal(checkpointer.restore(2, {"w": np.zeros(3)})["w"], np.ones(3))


# Orbax's failed read leaves tensorstore callbacks that hit its closed event loop ("Event loop is closed",
# unraisable exceptions printed as tracebacks); the Checkpointer silences exactly those.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_a_damaged_checkpoint_names_step_and_path_and_deletes_nothing(reference, tmp_path, damage):
    reference_workdir, _ = reference
    workdir = _copy(reference_workdir, tmp_path)
    # The array data of the latest step (orbax's OCDBT store).
    (data_file,) = glob.glob(str(workdir / "checkpoints" / str(NUM_STEPS) / "state" / "d" / "*"))
    if damage == "delete":
        os.remove(data_file)
    else:
        with open(data_file, "rb") as f:
            data = bytearray(f.read())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        with open(data_file, "wb") as f:
            f.write(data)
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(NUM_STEPS))
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(_config(**{"train.num_steps": 2 * NUM_STEPS}), str(workdir))
    message = str(error.value)
    assert f"checkpoint step {NUM_STEPS}" in message and path in message, message
    assert "--restore_step" in message
    assert "tensorstore_spec" not in message and len(message) < 800, message  # One readable paragraph.
    assert _saved_steps(workdir) == list(range(1, NUM_STEPS + 1))  # Nothing deleted.
    time.sleep(0.5)  # The callbacks arrive after the error.
    gc.collect()


def test_config_mismatch_is_refused_with_the_field_names(reference, tmp_path):
    reference_workdir, reference_state = reference
    workdir = _copy(reference_workdir, tmp_path)
    changed = _config(**{"inner.l2reg": 2.0, "train.meta_batch_size": 16})
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(changed, str(workdir))
    message = str(error.value)
    assert "inner.l2reg (saved 1.0, now 2.0)" in message and "train.meta_batch_size" in message, message
    assert "--allow_config_change" in message
    assert "logging" not in message and "num_steps" not in message

    # The override restores anyway; fields that do not change the maths never count.
    with checkpointing.Checkpointer(str(workdir), changed) as checkpointer:
        restored = checkpointer.restore_for_resume(
            reference_state, allow_config_change=True, log=lambda message: None
        )
    _assert_bitwise_equal(restored, reference_state)
    harmless = _config(
        **{
            "logging.every_steps": 5,
            "train.num_steps": 100,
            "checkpoint.every_steps": 7,
            "eval.every_steps": 3,
            "parallel.backend": "shard_map",
        }
    )
    assert checkpointing.differing_maths_fields(config_lib.to_dict(_config()), harmless) == []
    # Under a decaying schedule num_steps sets the schedule's length, so it does change the maths.
    cosine = _config(**{"outer.schedule": "cosine"})
    longer = _config(**{"outer.schedule": "cosine", "train.num_steps": 100})
    differing = checkpointing.differing_maths_fields(config_lib.to_dict(cosine), longer)
    assert [field.split(" ")[0] for field in differing] == ["train.num_steps"]


def test_a_checkpoint_older_than_a_field_resumes_with_that_fields_default():
    """A saved config written before a field existed counts as having its default (as evaluate reads it)."""
    older = config_lib.to_dict(_config())
    del older["outer"]["adam_eps"], older["meta_grad"]["damping"]
    assert checkpointing.differing_maths_fields(older, _config()) == []
    assert checkpointing.differing_maths_fields(older, _config(**{"meta_grad.damping": 1.0})) == [
        "meta_grad.damping (saved 0.0, now 1.0)"
    ]


def test_restore_step_that_does_not_exist_is_refused(reference, tmp_path):
    reference_workdir, _ = reference
    workdir = _copy(reference_workdir, tmp_path)
    with pytest.raises(checkpointing.CheckpointError, match=r"no complete checkpoint for step 99 .*avail"):
        train.train_and_evaluate(_config(), str(workdir), restore_step=99)


def test_preemption_watcher_flags_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with checkpointing.PreemptionWatcher() as watcher:
        assert not watcher.reached(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.reached(1) and watcher.reason == "SIGTERM"
    with checkpointing.PreemptionWatcher() as watcher:
        os.kill(os.getpid(), signal.SIGINT)
        assert watcher.reached(0) and watcher.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # A second Ctrl-C aborts at once.
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.slow
def test_checkpoint_from_4_devices_continues_on_2_then_on_1(reference, tmp_path):
    """Host-array checkpoints restore onto any device count; results agree with one device to roundoff."""
    _, reference_state = reference
    legs = [
        (3, {"parallel.backend": "shard_map", "parallel.num_devices": 4}),
        (6, {"parallel.backend": "shard_map", "parallel.num_devices": 2}),
        (NUM_STEPS, {"parallel.backend": "none"}),
    ]
    previous_steps = 0
    for num_steps, parallel in legs:
        config = _config(**{"train.num_steps": num_steps, **parallel})
        result = train.train_and_evaluate(config, str(tmp_path))
        assert result.backend.num_devices == parallel.get("parallel.num_devices", 1)
        assert result.history[0]["step"] == previous_steps + 1
        previous_steps = num_steps
    assert int(result.state.step) == NUM_STEPS
    np.testing.assert_array_equal(result.state.task_key, reference_state.task_key)
    # Batches of 2, 4 and 8 tasks per device round differently; inner solves stop at tol 1e-6, which amplifies
    # that a little: measured 3.0e-10 at most (parameters are of order 0.1).
    max_difference = max(
        float(np.max(np.abs(actual - expected)))
        for actual, expected in zip(
            jax.tree.leaves(result.state), jax.tree.leaves(reference_state), strict=True
        )
    )
    assert max_difference < 1e-9
    _assert_each_step_logged_once(tmp_path)
