"""Multi-process runs on 127.0.0.1: trainer/distributed.py, launch/local.py, and the trainer under them.

The `multiprocess` tests start real processes (jax.distributed with gloo on CPU); the others check the
settings logic and the launcher's helpers without JAX's runtime.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import local as launcher
from tests import helpers
from trainer import distributed, monitoring

NUM_STEPS = 3
# Well-conditioned and converged (lambda = 1, tight inner tolerance, tight CG), so that the only difference
# between layouts is the order of the cross-device sums.
TRAIN_FLAGS = [
    "--config=configs/smoke.py",
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.inner.l2reg=1.0",
    "--config.inner.tol=1e-10",
    "--config.inner.maxiter=500",
    "--config.meta_grad.solver_tol=1e-12",
    "--config.meta_grad.solver_maxiter=200",
    "--config.eval.every_steps=0",
    "--config.eval.num_tasks=2",
    "--config.checkpoint.every_steps=0",
    "--config.logging.every_steps=1",
]


def _start_launcher(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(helpers.REPO, "launch", "local.py"), *args],
        cwd=helpers.REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    """Stops a launcher the way a user would (SIGTERM: it stops its processes too), then for sure."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _final_state(workdir: str, step: int) -> dict:
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _event_files(workdir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(workdir, "tensorboard")):
        found += [os.path.join(root, f) for f in files if f.startswith("events.out.tfevents")]
    return found


@pytest.mark.multiprocess
def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    one_dir, two_dir = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    # Both runs at once: XLA compiles on one core per process, so three processes share two cores better.
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:  # A file, not a pipe: nobody reads it while the reference runs.
        launcher_proc = _start_launcher(
            [
                "--num_processes",
                "2",
                "--devices_per_process",
                "2",
                "--",
                *TRAIN_FLAGS,
                f"--workdir={two_dir}",
            ],
            log,
        )
        try:
            one = helpers.run_cli([*TRAIN_FLAGS, f"--workdir={one_dir}"], num_devices=4)
            launcher_proc.wait(timeout=600)
        finally:
            _stop(launcher_proc)
    two_output = log_path.read_text()
    assert one.returncode == 0, one.stdout + one.stderr
    assert launcher_proc.returncode == 0, two_output
    assert "launch: all 2 processes finished" in two_output
    assert "on 4 device(s)" in two_output  # One global mesh over both processes' devices.

    one_metrics, two_metrics = _metrics(one_dir), _metrics(two_dir)
    # Only process 0 writes: each step once (two writers would duplicate every line), one event file.
    assert [m["step"] for m in two_metrics] == list(range(1, NUM_STEPS + 1))
    assert len(_event_files(two_dir)) == len(_event_files(one_dir)) == 1
    # tensorboardX names event files by time and host only, so two writers could share one file: count events.
    events = EventAccumulator(monitoring.tensorboard_dir(two_dir), size_guidance={"scalars": 0})
    events.Reload()
    tag = monitoring.tensorboard_tag("query_loss")
    assert [e.step for e in events.Scalars(tag)] == list(range(1, NUM_STEPS + 1))
    assert not any(line.startswith("[process 1] step") for line in two_output.splitlines())
    for m in one_metrics + two_metrics:
        assert m["inner_converged_fraction"] == 1.0, m  # Otherwise roundoff is amplified (PITFALLS.md).

    one_state, two_state = _final_state(one_dir, NUM_STEPS), _final_state(two_dir, NUM_STEPS)
    assert int(one_state["step"]) == int(two_state["step"]) == NUM_STEPS
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.float64(a) - np.float64(b)))), one_state, two_state
    )
    max_diff = max(jax.tree.leaves(diffs))
    print(f"max |state(2 processes x 2 devices) - state(1 process x 4 devices)| = {max_diff:.3g}")
    assert max_diff <= 1e-10, diffs
    # The comparison is not vacuous: training moved the parameters.
    assert all(m["update_norm"] > 1e-4 for m in two_metrics)
    np.testing.assert_allclose(
        [m["query_loss"] for m in two_metrics], [m["query_loss"] for m in one_metrics], rtol=1e-10
    )


@pytest.mark.multiprocess
def test_launcher_names_the_killed_process_and_stops_the_others(tmp_path):
    cmd = [
        sys.executable,
        "-u",
        os.path.join(helpers.REPO, "launch", "local.py"),
        "--num_processes",
        "2",
        "--devices_per_process",
        "1",
        "--grace_s",
        "5",
        "--",
        "--config=configs/smoke.py",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.num_steps=100000",
    ]
    proc = subprocess.Popen(
        cmd, cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    pids: dict[int, int] = {}
    killed = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("launch: process ") and " pid " in line:
                words = line.split()
                pids[int(words[2])] = int(words[4])
            # Kill process 1 once both processes have joined the run and the trainer has started.
            if "[process 0] training" in line and not killed.is_set():
                os.kill(pids[1], signal.SIGKILL)
                killed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=300)  # A hang here (survivors never stopped) fails the test.
    finally:
        _stop(proc)
    reader.join(timeout=10)
    output = "".join(lines)
    assert killed.is_set(), output
    assert returncode == 128 + signal.SIGKILL, output
    assert f"launch: process 1 (pid {pids[1]}) was killed by SIGKILL; terminating process(es) 0" in output
    for pid in pids.values():  # Every process is gone.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _trainer_process(process_id: int, port: int, workdir: str, extra: list[str]) -> subprocess.Popen:
    env = launcher.process_env(dict(os.environ), "cpu", process_id, 1)
    cmd = [
        sys.executable,
        "-m",
        "trainer.main",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={process_id}",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=helpers.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.multiprocess
def test_survivor_exits_on_its_own_after_the_heartbeat_timeout(tmp_path):
    """Without a launcher to stop it, process 0 must not hang when process 1 dies."""
    port = launcher.free_port()
    extra = ["--heartbeat_timeout_s=5", "--config.train.num_steps=100000"]
    survivor = _trainer_process(0, port, str(tmp_path), extra)
    victim = _trainer_process(1, port, str(tmp_path), extra)
    lines = []
    try:
        for line in survivor.stdout:  # Until both have joined the run and the trainer started.
            lines.append(line)
            if line.startswith("training "):
                break
        victim.kill()
        victim.wait(timeout=30)
        started = time.monotonic()
        lines += survivor.stdout.readlines()  # EOF when the survivor exits.
        returncode = survivor.wait(timeout=120)  # The default heartbeat timeout (100 s) would fail here.
        waited = time.monotonic() - started
    finally:
        for p in (survivor, victim):
            if p.poll() is None:
                p.kill()
    output = "".join(lines)
    print(f"survivor exited {waited:.1f} s after process 1 was killed (heartbeat timeout 5 s)")
    assert returncode != 0, output
    assert "another task died" in output, output


@pytest.mark.multiprocess
def test_unreachable_coordinator_fails_with_a_clear_message(tmp_path):
    port = launcher.free_port()  # Nobody listens there.
    proc = _trainer_process(1, port, str(tmp_path), ["--distributed_timeout_s=2"])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert f"could not reach the coordinator (process 0) at 127.0.0.1:{port} within 2 s" in output, output


# --- A coordinator port that another process holds ---

# How a stray process may hold the port: (family, address, listen, SO_REUSEPORT). Each made jaxlib 0.10.2's
# process 0 segfault ("Failed to add port to server"), except the SO_REUSEPORT one (how gRPC itself binds, so
# another run's coordinator): there both coordination services shared the port and the first run crashed.
PORT_HOLDERS = {
    "listening on 127.0.0.1": (socket.AF_INET, "127.0.0.1", True, False),
    "listening on 0.0.0.0": (socket.AF_INET, "0.0.0.0", True, False),
    "listening on [::]": (socket.AF_INET6, "::", True, False),
    "bound to 127.0.0.1, not listening": (socket.AF_INET, "127.0.0.1", False, False),
    "listening with SO_REUSEPORT, like gRPC": (socket.AF_INET, "127.0.0.1", True, True),
}


@contextlib.contextmanager
def _held_port(holder: str):
    """Yields a port that a socket of this process holds, as PORT_HOLDERS[holder] says."""
    family, address, listen, reuse_port = PORT_HOLDERS[holder]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, 0))
        if listen:
            sock.listen()
        yield sock.getsockname()[1]


@contextlib.contextmanager
def _coordinator_holding_port():
    """Yields the port of a JAX coordination service in another process: what another run's process 0 holds."""
    port = launcher.free_port()
    code = (
        "import sys; from jax._src.lib import _jax; "
        "service = _jax.get_distributed_runtime_service(sys.argv[1], 2); print('ready', flush=True); "
        "sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, f"[::]:{port}"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.kill()
        proc.wait()


def _assert_one_clear_line(output: str) -> None:
    assert "Traceback" not in output, output
    assert "Segmentation" not in output and "Fatal Python error" not in output, output


@pytest.mark.multiprocess
@pytest.mark.parametrize("holder", ["listening on 127.0.0.1", "another run's coordinator"])
def test_launcher_refuses_a_port_in_use_before_starting_processes(tmp_path, holder):
    held = _coordinator_holding_port() if holder == "another run's coordinator" else _held_port(holder)
    with held as port:
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(helpers.REPO, "launch", "local.py"),
                "--num_processes=2",
                f"--port={port}",
                "--",
                "--config=configs/smoke.py",
                f"--workdir={tmp_path / 'run'}",
            ],
            cwd=helpers.REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
        assert distributed.port_in_use(port)  # The trainer's process 0 would refuse it as well.
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"coordinator port {port} is already in use" in proc.stderr, proc.stderr
    assert "--port" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    _assert_one_clear_line(proc.stdout + proc.stderr)
    assert "launch: process" not in proc.stdout  # Nothing was started.
    assert not (tmp_path / "run").exists()
    assert elapsed < 10, elapsed  # No JAX import, let alone a compile.


@pytest.mark.multiprocess
@pytest.mark.parametrize("holder", ["listening on 127.0.0.1", "listening with SO_REUSEPORT, like gRPC"])
def test_process_0_names_the_port_in_use(tmp_path, holder):
    """Started without the launcher (as on a cluster), process 0 checks the port itself."""
    with _held_port(holder) as port:
        proc = helpers.run_cli(
            [
                "--config=configs/smoke.py",
                f"--workdir={tmp_path / 'run'}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                "--process_id=0",
                "--distributed_timeout_s=5",
            ],
            timeout=60,
        )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"coordinator 127.0.0.1:{port}: port {port} is already in use" in errors[0]
    assert "--coordinator_address" in errors[0] and "JAX_COORDINATOR_ADDRESS" in errors[0]
    _assert_one_clear_line(proc.stdout + proc.stderr)
    assert not (tmp_path / "run").exists()  # Failed before training (and any compile) started.


# --- Settings and launcher helpers (no processes started) ---

NO_CLUSTER = (None, None)


def test_single_process_without_settings_or_cluster():
    assert distributed.resolve(environ={}, cluster=NO_CLUSTER) is None
    assert distributed.resolve(num_processes=1, environ={}, cluster=NO_CLUSTER) is None
    assert distributed.resolve(environ={}, cluster=("slurm", 1)) is None  # A one-task SLURM job.


def test_explicit_settings_from_flags_or_environment():
    flags = distributed.resolve("10.0.0.1:1234", 4, 3, environ={}, cluster=NO_CLUSTER)
    assert flags == distributed.Settings("10.0.0.1:1234", 4, 3, None)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ=env, cluster=NO_CLUSTER) == flags
    assert distributed.resolve(process_id=0, environ=env, cluster=NO_CLUSTER).process_id == 0  # Flags win.


def test_cluster_fills_in_what_is_not_given():
    auto = distributed.resolve(environ={}, cluster=("slurm", 8))
    assert auto == distributed.Settings(None, None, None, "slurm")
    partial = distributed.resolve(coordinator_address="node1:1234", environ={}, cluster=("slurm", 8))
    assert partial == distributed.Settings("node1:1234", None, None, "slurm")


@pytest.mark.parametrize(
    "kwargs, environ, message",
    [
        (dict(coordinator_address="h:1"), {}, "missing --num_processes (or JAX_NUM_PROCESSES), --process_id"),
        (dict(num_processes=2, process_id=0), {}, "missing --coordinator_address"),
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=2),
            {},
            "0 <= process_id < num_processes",
        ),
        (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), {}, "expected HOST:PORT"),
        (
            dict(coordinator_address="h:1", process_id=0),
            {"JAX_NUM_PROCESSES": "two"},
            "JAX_NUM_PROCESSES='two'",
        ),
    ],
)
def test_bad_settings_name_the_setting(kwargs, environ, message):
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.resolve(**kwargs, environ=environ, cluster=NO_CLUSTER)


def test_launcher_gives_each_process_its_own_devices():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"}
    env = launcher.process_env(base, "cpu", 1, 2)
    assert env["XLA_FLAGS"].split() == [
        "--xla_cpu_enable_fast_math=false",
        "--xla_force_host_platform_device_count=2",
    ]
    assert env["JAX_PLATFORMS"] == "cpu"
    gpu_env = launcher.process_env({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, "gpu", 1, 2)
    assert gpu_env["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert launcher.process_env({}, "gpu", 1, 2)["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert launcher.describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert launcher.describe_exit(3) == "exited with code 3"


@pytest.mark.parametrize("holder", list(PORT_HOLDERS))
def test_port_check_finds_a_port_held_on_any_local_address(holder):
    with _held_port(holder) as port:
        assert distributed.port_in_use(port)
        assert launcher.port_in_use(port)  # The launcher's own copy of the test agrees.
        settings = distributed.Settings(f"127.0.0.1:{port}", 2, 0, None)
        with pytest.raises(distributed.DistributedError, match=f"port {port} is already in use") as e:
            distributed.check_coordinator_port(settings, environ={})
    assert "--coordinator_address (or JAX_COORDINATOR_ADDRESS)" in str(e.value)
    assert "--port" in str(e.value)


def test_port_check_passes_a_free_port_and_one_left_in_time_wait():
    port = launcher.free_port()
    assert not distributed.port_in_use(port) and not launcher.port_in_use(port)
    distributed.check_coordinator_port(distributed.Settings(f"127.0.0.1:{port}", 2, 0, None), environ={})
    # A finished run's connections leave its port in TIME_WAIT, which gRPC binds over (SO_REUSEADDR).
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # The server side closes first: its end of the connection stays in TIME_WAIT.
        time.sleep(0.1)
        client.close()
    with socket.socket() as plain, pytest.raises(OSError) as e:
        plain.bind(("127.0.0.1", port))  # Without SO_REUSEADDR the port still looks taken.
    assert e.value.errno == errno.EADDRINUSE
    assert not distributed.port_in_use(port) and not launcher.port_in_use(port)


def test_port_check_only_for_process_0_which_binds_the_port_here_whatever_the_host():
    with _held_port("listening on 0.0.0.0") as port:
        # Process 0 binds [::]:PORT locally even for a name that does not resolve here (TEST-NET-1).
        for host in ("127.0.0.1", "localhost", socket.gethostname(), "[::1]", "192.0.2.1"):
            with pytest.raises(distributed.DistributedError, match=f"port {port}"):
                distributed.check_coordinator_port(distributed.Settings(f"{host}:{port}", 2, 0, None), {})
        # The other processes only connect.
        distributed.check_coordinator_port(distributed.Settings(f"127.0.0.1:{port}", 2, 1, None), {})
        distributed.check_coordinator_port(distributed.Settings(None, None, None, "slurm"), {})


def test_port_check_tests_the_bind_address_jax_will_use():
    free = launcher.free_port()
    with _held_port("listening on 127.0.0.1") as held:
        env = {distributed.ENV_BIND_ADDRESS: f"127.0.0.1:{held}"}
        with pytest.raises(
            distributed.DistributedError, match=f"JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:{held}"
        ):
            distributed.check_coordinator_port(distributed.Settings(f"127.0.0.1:{free}", 2, 0, None), env)
        env = {distributed.ENV_BIND_ADDRESS: f"[::]:{free}"}  # JAX binds there, not to the held port.
        distributed.check_coordinator_port(distributed.Settings(f"127.0.0.1:{held}", 2, 0, None), env)


@pytest.mark.multiprocess
def test_a_second_multi_process_job_on_a_held_workdir_stops_in_every_process(tmp_path):
    """Process 0 finds the workdir's lock held; every process learns it from process 0 and stops at once."""
    from tests.test_workdir import _start_holder

    workdir = tmp_path / "run"
    holder = _start_holder(workdir)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(helpers.REPO, "launch", "local.py"),
                "--num_processes",
                "2",
                "--devices_per_process",
                "1",
                "--",
                "--config=configs/smoke.py",
                f"--workdir={workdir}",
            ],
            cwd=helpers.REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert f"[process 0] error: workdir {workdir} is in use by another run (pid {holder.pid} " in output, (
        output
    )
    assert (
        f"[process 1] error: process 0 could not lock workdir {workdir} (held by pid {holder.pid} " in output
    )
    assert "Traceback" not in output and "training" not in output, output


def test_the_start_up_line_says_what_is_known_and_never_question_marks(monkeypatch):
    explicit = distributed.start_line(distributed.Settings("127.0.0.1:1234", 2, 0, None))
    assert explicit == "process 0 of 2 (explicit settings): connecting to coordinator 127.0.0.1:1234"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    slurm.update(SLURM_STEP_NODELIST="node1", SLURM_NODELIST="node1")
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    settings = distributed.resolve(environ={})
    assert settings.cluster == "slurm"
    assert distributed.start_line(settings).startswith("process 1 of 2 (from slurm's environment)")
    unknown = distributed.start_line(distributed.Settings(None, None, None, "no_such_cluster"))
    assert "?" not in unknown and unknown.startswith("this process (from no_such_cluster's environment)")
