"""`trainer.workdir`: one run per workdir, atomic writes, and full, read-only or failing disks.

The end-to-end cases (two runs at once, a full disk under a real run) start `trainer.main` as users do;
full disks are tiny tmpfs mounts (skipped where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers
from trainer import monitoring, workdir


def _start_holder(path) -> subprocess.Popen:
    """Another process that holds `path`'s lock until it is killed."""
    code = (
        "import sys, time; from trainer import workdir; "
        "workdir.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        cwd=helpers.REPO,
        env=dict(os.environ, PYTHONPATH=helpers.REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_lock_refuses_a_second_run_naming_the_holder_and_is_removed_on_release(tmp_path):
    with workdir.WorkdirLock(str(tmp_path)) as first:
        assert first.held and os.path.exists(tmp_path / workdir.LOCK_NAME)
        with pytest.raises(workdir.WorkdirLockedError) as refused:
            workdir.WorkdirLock(str(tmp_path)).acquire()  # Same process, another open file: refused too.
        message = str(refused.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert str(tmp_path) in message and "another --workdir" in message
        assert workdir.recorded_holder(str(tmp_path)).pid == os.getpid()
    assert not os.path.exists(tmp_path / workdir.LOCK_NAME)
    messages = []
    with workdir.WorkdirLock(str(tmp_path), log=messages.append):
        pass
    assert messages == []  # A released lock leaves nothing to take over.


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(tmp_path):
    holder = _start_holder(tmp_path)
    with pytest.raises(workdir.WorkdirLockedError, match=f"pid {holder.pid} "):
        workdir.WorkdirLock(str(tmp_path)).acquire()
    holder.kill()  # SIGKILL: no cleanup runs, the file stays; the kernel drops the flock.
    holder.wait()
    assert os.path.exists(tmp_path / workdir.LOCK_NAME)
    messages = []
    with workdir.WorkdirLock(str(tmp_path), log=messages.append):
        assert workdir.recorded_holder(str(tmp_path)).pid == os.getpid()
    assert len(messages) == 1 and "ended without releasing it" in messages[0]
    assert f"pid {holder.pid} " in messages[0]


def test_without_filesystem_locks_the_recorded_holder_decides(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir.fcntl, "flock", no_locks)
    holder = _start_holder(tmp_path / "alive")  # Writes its record with real locks (another process).
    with pytest.raises(workdir.WorkdirLockedError, match=f"pid {holder.pid} "):
        workdir.WorkdirLock(str(tmp_path / "alive")).acquire()
    holder.kill()
    holder.wait()
    with workdir.WorkdirLock(str(tmp_path / "alive")):  # Dead on this host: taken over.
        pass

    os.makedirs(tmp_path / "elsewhere")
    record = dict(host="another-host", pid=1, started="yesterday", command="python -m trainer.main")
    (tmp_path / "elsewhere" / workdir.LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(workdir.WorkdirLockedError, match="cannot be checked from here: if it is not, delete"):
        workdir.WorkdirLock(str(tmp_path / "elsewhere")).acquire()


def test_write_atomically_leaves_the_old_file_or_nothing_when_the_write_fails(tmp_path):
    path = str(tmp_path / "out.json")
    workdir.write_atomically(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as raised:
        workdir.write_atomically(path, fail)
    assert raised.value.filename == path and raised.value.errno == errno.ENOSPC
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["out.json"]
    assert oct(os.stat(path).st_mode & 0o777) != oct(
        0o600
    )  # Readable as the umask allows, not mkstemp's 0600.


def test_a_failed_metrics_line_is_undone(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    monitoring.append_line(path, '{"step": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(monitoring.os, "write", half_then_full)
    with pytest.raises(OSError) as raised:
        monitoring.append_line(path, '{"step": 2, "loss": 0.5}\n')
    monkeypatch.undo()
    assert raised.value.filename == path
    assert open(path).read() == '{"step": 1}\n'


def test_a_tensorboard_thread_that_dies_fails_the_writer_without_a_traceback(tmp_path, monkeypatch, capfd):
    import tensorboardX.record_writer

    writer = monitoring.MetricsWriter(str(tmp_path), stream=open(os.devnull, "w"))
    writer.write(1, {"query_loss": np.float32(1.0)})

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorboardX.record_writer.RecordWriter, "write", full_disk)
    with pytest.raises(OSError) as raised:
        for step in range(2, 50):  # The thread dies on its next event; a later write notices.
            writer.write(step, {"query_loss": np.float32(step)})
            time.sleep(0.02)
    assert raised.value.filename == monitoring.tensorboard_dir(str(tmp_path))
    assert workdir.environment_error(raised.value).startswith("cannot write")
    writer.close()  # Abandoned: closing again neither raises nor prints.
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Real runs on full and read-only filesystems


@contextlib.contextmanager
def _tmpfs(path, size: str, read_only: bool = False):
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _run(args, timeout=600):
    return helpers.run_cli(["--config=configs/smoke.py", *args], timeout=timeout, num_devices=1)


def _assert_one_line_error(proc, text):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and text in errors[0], proc.stderr


def _assert_no_partial_files(root):
    partial = [p for p in glob.glob(f"{root}/**/*", recursive=True) if ".tmp" in os.path.basename(p)]
    assert partial == [], partial
    assert not glob.glob(f"{root}/**/*.orbax-checkpoint-tmp*", recursive=True)
    path = os.path.join(root, "metrics.jsonl")
    if os.path.exists(path):
        monitoring.read_jsonl(path)  # Every line is whole.


def test_a_full_disk_fails_the_run_in_one_line_and_leaves_no_partial_files(tmp_path):
    with _tmpfs(tmp_path / "fresh", "1m") as mount:  # Too small for the first compilation cache entries.
        proc = _run([f"--workdir={mount}/run", "--config.train.num_steps=20"])
        _assert_one_line_error(proc, "No space left on device")
        _assert_no_partial_files(mount)
    # Room for the start, then the disk fills while saving checkpoints: the earlier ones stay restorable.
    with _tmpfs(tmp_path / "filling", "400k") as mount:
        proc = _run(
            [
                f"--workdir={mount}/run",
                f"--config.compile_cache_dir={tmp_path}/cache",
                "--config.train.num_steps=400",
                "--config.eval.every_steps=0",
                "--config.checkpoint.every_steps=2",
            ]
        )
        _assert_one_line_error(proc, "No space left on device")
        _assert_no_partial_files(mount)
        from trainer import checkpointing

        with checkpointing.Checkpointer(f"{mount}/run") as reader:
            for step in reader.all_steps():
                assert reader.saved_meta(step)["step"] == step


def test_a_read_only_workdir_is_one_line(tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        proc = _run([f"--workdir={mount}/run"], timeout=120)
        _assert_one_line_error(proc, "Read-only file system")


# --------------------------------------------------------------------------------------------------------
# Signals during start-up


def _catches_sigterm(pid: int) -> bool:
    """Whether `pid` has a SIGTERM handler installed (/proc/<pid>/status SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("moment", ["imports", "compilation"])
def test_sigterm_during_start_up_exits_75_with_nothing_saved(tmp_path, moment):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=helpers.REPO)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trainer.main",
            "--config=configs/smoke.py",
            f"--workdir={tmp_path}",
            "--config.compile_cache_dir=none",
        ],
        cwd=helpers.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    if moment == "compilation":  # The first line is printed just before the step is compiled.
        assert "training" in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == workdir.PREEMPTED_EXIT_STATUS, out + err
    assert "preempted: SIGTERM" in err and "nothing" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")
    assert not os.path.exists(tmp_path / workdir.LOCK_NAME)


def test_a_full_disk_reported_by_tensorstore_is_named_as_such():
    """Orbax's save on a full disk can fail in tensorstore (RESOURCE_EXHAUSTED, the OS error past 400 chars)."""
    from trainer import checkpointing

    long = (
        'RESOURCE_EXHAUSTED: Error writing local file "'
        + "/x" * 300
        + '": [OS error: No space left on device]'
    )
    line = checkpointing._one_line(ValueError(long))
    assert line.startswith("No space left on device (RESOURCE_EXHAUSTED") and len(line) < 500
    assert checkpointing._one_line(OSError(28, "No space left on device")) == "No space left on device"
