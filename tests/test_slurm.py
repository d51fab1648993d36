"""launch/slurm.sbatch on a real (one-node, local) SLURM cluster: the job trains like launch/local.py, and a job
stopped with `scancel` mid-run resumes exactly when submitted again.

The scenario (the `runs` fixture, ~1.5-2 minutes on 2 cores): `CONFIG=configs/smoke.py WORKDIR=DIR sbatch
--nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 launch/slurm.sbatch ARGS`, `scancel` once
training has started, the same sbatch again, run to the end; beside it a 2-process launch/local.py run of the
same config, the uninterrupted reference. Both are 2 processes x 1 CPU device, the same programs on the same
layout: the SLURM job's metrics and final state must match the local run's to the tolerance of
tests/test_multiprocess.py (measured: bitwise), and the resumed state the uninterrupted one bit for bit.

Needs Debian's `slurm-wlm` and `munge` (`.ci/run` installs them); skipped without `sbatch`. Uses the cluster
that SLURM_CONF or /etc/slurm/slurm.conf names if its controller answers, else starts one on 127.0.0.1 for this
module (tests/slurm_cluster.py; root needed) and stops it at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers, slurm_cluster
from tests.test_multiprocess import TRAIN_FLAGS

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess]

NUM_STEPS = 100  # ~40 ms a step: a few seconds of training, so that a scancel after step 1 lands mid-run.
# The overrides of tests/test_multiprocess.py (well-conditioned, converged), with more steps and periodic
# checkpoints (the config file itself comes from the job's CONFIG).
TRAIN_ARGS = [
    *(
        f
        for f in TRAIN_FLAGS
        if not f.startswith(("--config=", "--config.train.num_steps=", "--config.checkpoint."))
    ),
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.checkpoint.every_steps=25",
]
# What the job's resources are, as the issue submits it; --output and --time keep the test tidy and bounded
# (a job left behind by a killed test ends by itself).
SBATCH = [
    "sbatch",
    "--parsable",
    "--nodes=1",
    "--ntasks-per-node=2",
    "--gpus-per-node=0",
    "--cpus-per-task=1",
    "--time=10",
    "--job-name=imaml-test",
]
JOB_TIMEOUT_S = 300  # Each job: ~40 s on an idle 2-core machine.
TIMEOUTS = {"DISTRIBUTED_TIMEOUT_S": "120", "HEARTBEAT_TIMEOUT_S": "60"}  # Instead of the script's 600/100 s.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = slurm_cluster.missing_programs()
    if "sbatch" in missing:
        pytest.skip("sbatch is not installed (Debian: apt-get install slurm-wlm munge; .ci/run does)")
    if slurm_cluster.running_cluster():
        yield slurm_cluster.Clients()  # The ambient cluster; its jobs must see this machine's /tmp.
        return
    if missing:
        pytest.skip(f"no SLURM cluster is running and {', '.join(missing)} is not installed to start one")
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster is running, and starting one (slurmd) needs root")
    local = slurm_cluster.LocalCluster(str(tmp_path_factory.mktemp("slurm-cluster")))
    started = time.monotonic()
    try:  # A machine whose container cannot run the daemons says why and skips; the jobs' checks still fail.
        local.start(timeout_s=60)
    except slurm_cluster.ClusterError as e:
        local.stop()
        pytest.skip(f"could not start a one-node SLURM cluster here: {e}")
    seconds = time.monotonic() - started
    print(f"started a one-node SLURM cluster ({local.name}, {local.cpus} CPUs) in {seconds:.1f} s")
    try:
        yield local
    finally:
        local.stop()


def _job_env(workdir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices: 1 per process.
    env.update(
        CONFIG="configs/smoke.py",
        WORKDIR=workdir,
        PYTHON=sys.executable,  # The script's default is .venv/bin/python; this is the test's interpreter.
        PYTHONUNBUFFERED="1",  # The job's output file shows each step as it happens.
        JAX_PLATFORMS="cpu",
        **TIMEOUTS,
    )
    return env


class Job:
    """A submission of launch/slurm.sbatch, its output file and its wall time."""

    def __init__(self, cluster, workdir: str, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.cluster = cluster
        self.started = time.monotonic()
        proc = cluster.run_client(
            [*SBATCH, f"--output={out_dir}/slurm-%j.out", "launch/slurm.sbatch", *TRAIN_ARGS],
            env=_job_env(workdir),
            cwd=helpers.REPO,  # "Submit from the repository root."
            check=False,
        )
        assert proc.returncode == 0, f"sbatch failed: {proc.stdout}{proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]
        self.output_path = os.path.join(out_dir, f"slurm-{self.id}.out")
        self.seconds = None

    def output(self) -> str:
        try:
            with open(self.output_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        proc = self.cluster.run_client(["squeue", "-h", "-j", self.id, "-o", "%T"], check=False)
        return bool(proc.stdout.strip())  # Empty (or "Invalid job id") once it has left the queue.

    def info(self) -> dict[str, str]:
        proc = self.cluster.run_client(["scontrol", "-o", "show", "job", self.id], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def describe(self) -> str:
        return f"job {self.id} {self.info()}\n--- {self.output_path}\n{self.output()[-6000:]}\n{self.cluster.log_tails()}"

    def wait(self, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Waits until the job has left the queue; returns scontrol's fields (JobState, ExitCode, RunTime...)."""
        deadline = time.monotonic() + timeout_s
        while self.running():
            if time.monotonic() > deadline:
                self.cancel()
                pytest.fail(f"job {self.id} still running after {timeout_s} s; cancelled\n{self.describe()}")
            time.sleep(0.5)
        self.seconds = time.monotonic() - self.started
        return self.info()

    def wait_for_output(self, pattern: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.output(), re.MULTILINE):
            if not self.running():
                pytest.fail(f"job {self.id} ended before printing {pattern!r}\n{self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.id}: no {pattern!r} after {timeout_s} s\n{self.describe()}")
            time.sleep(0.05)

    def cancel(self) -> None:
        self.cluster.run_client(["scancel", self.id], check=False)


def _local_run(workdir: str, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # The launcher sets each process's own.
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(helpers.REPO, "launch", "local.py"),
            "--num_processes=2",
            "--devices_per_process=1",
            "--",
            "--config=configs/smoke.py",
            f"--workdir={workdir}",
            f"--distributed_timeout_s={TIMEOUTS['DISTRIBUTED_TIMEOUT_S']}",
            f"--heartbeat_timeout_s={TIMEOUTS['HEARTBEAT_TIMEOUT_S']}",
            *TRAIN_ARGS,
        ],
        cwd=helpers.REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=slurm_cluster.die_with_parent,  # SIGTERM (it stops its processes) if the test dies.
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # The launcher stops its processes too.
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _steps(workdir: str) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if os.path.isdir(folder) else []


def _state(workdir: str, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _max_abs_diff(a: dict, b: dict) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.float64(x) - np.float64(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def _bitwise_equal(a: dict, b: dict) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """What both tests check: the SLURM job (submitted, stopped with scancel once training has started, submitted
    again and run to the end) and, beside it, a launch/local.py run of the same config, the uninterrupted
    reference. Side by side: XLA compiles on one core per process, so four processes share two cores better
    than two at a time, and the test takes three trainings' time, not four."""
    root = tmp_path_factory.mktemp("runs")
    slurm_dir, local_dir, out_dir = str(root / "slurm"), str(root / "local"), str(root / "slurm-out")
    log_path = root / "local.log"
    with open(log_path, "w") as log:
        local_started = time.monotonic()
        local = _local_run(local_dir, log)
        local_seconds: list[float] = []  # Its wall time, noted when it ends (while the SLURM jobs go on).

        def note_end():
            local.wait()
            local_seconds.append(time.monotonic() - local_started)

        timer = threading.Thread(target=note_end, daemon=True)
        timer.start()
        try:
            first = Job(cluster, slurm_dir, out_dir)
            try:
                first.wait_for_output(r"^step 1:")  # Compiled and training: cancel mid-run.
                first.cancel()
                first_info = first.wait()
            finally:
                if first.running():
                    first.cancel()
            second = Job(cluster, slurm_dir, out_dir)  # The same command again.
            try:
                second_info = second.wait()
            finally:
                if second.running():
                    second.cancel()
            local.wait(timeout=JOB_TIMEOUT_S)
            timer.join(timeout=10)
        finally:
            _stop(local)
    print(
        f"\nSLURM job {first.id}: {first_info.get('JobState')} after {first.seconds:.1f} s; resubmitted as job "
        f"{second.id}: {second_info.get('JobState')} after {second.seconds:.1f} s; launch/local.py: exit "
        f"{local.returncode} after {local_seconds[0]:.1f} s"
    )
    return {
        "first": (first, first_info),
        "second": (second, second_info),
        "slurm": slurm_dir,
        "local": local_dir,
        "local_log": log_path.read_text(),
    }


def test_slurm_job_trains_like_the_local_launcher(runs):
    (first, _), (second, second_info) = runs["first"], runs["second"]
    slurm_dir, local_dir = runs["slurm"], runs["local"]
    assert "launch: all 2 processes finished" in runs["local_log"], runs["local_log"][-6000:]
    assert "imaml: 2 processes on 1 node(s)" in first.output(), first.describe()
    assert f"training {NUM_STEPS} steps from step 0 on 2 device(s)" in first.output(), first.describe()
    assert second_info.get("JobState") == "COMPLETED" and second_info.get("ExitCode") == "0:0", (
        second.describe()
    )
    assert _steps(slurm_dir)[-1] == _steps(local_dir)[-1] == NUM_STEPS, (_steps(slurm_dir), _steps(local_dir))

    # Every step, those before the scancel and those after: only process 0 writes, each step once.
    slurm_metrics, local_metrics = _metrics(slurm_dir), _metrics(local_dir)
    assert (
        [m["step"] for m in slurm_metrics]
        == [m["step"] for m in local_metrics]
        == list(range(1, NUM_STEPS + 1))
    )
    assert all(m["inner_converged_fraction"] == 1.0 for m in slurm_metrics + local_metrics)
    assert all(
        m["update_norm"] > 1e-4 for m in slurm_metrics
    )  # Not vacuous: every step moved the parameters.
    for name in ("query_loss", "support_loss", "grad_norm", "update_norm"):
        np.testing.assert_allclose(
            [m[name] for m in slurm_metrics], [m[name] for m in local_metrics], rtol=1e-10, err_msg=name
        )
    slurm_state, local_state = _state(slurm_dir, NUM_STEPS), _state(local_dir, NUM_STEPS)
    assert int(slurm_state["step"]) == int(local_state["step"]) == NUM_STEPS
    max_diff = _max_abs_diff(slurm_state, local_state)
    print(
        f"max |state(SLURM) - state(launch/local.py)| at step {NUM_STEPS} over "
        f"{len(jax.tree.leaves(slurm_state))} arrays = {max_diff:.3g} "
        f"(bitwise equal: {_bitwise_equal(slurm_state, local_state)})"
    )
    assert max_diff <= 1e-10  # tests/test_multiprocess.py's tolerance; the same layout here, so in fact 0.


def test_scancelled_job_resumes_exactly_when_resubmitted(runs):
    (first, first_info), (second, _) = runs["first"], runs["second"]
    # scancel: SIGTERM to every task (SIGKILL KillWait later); the trainer saves the step all agree on, exits 75.
    assert first_info.get("JobState") == "CANCELLED", first.describe()
    saved = re.findall(r"^preempted: SIGTERM: saved step (\d+)", first.output(), re.MULTILINE)
    assert saved and len(set(saved)) == 1, first.describe()  # Each process that says so: the same step.
    stopped_at = int(saved[0])
    assert 0 < stopped_at < NUM_STEPS, f"scancel did not land mid-run\n{first.describe()}"
    assert f"training {NUM_STEPS} steps from step {stopped_at} on 2 device(s)" in second.output(), (
        second.describe()
    )
    print(f"scancelled at step {stopped_at} of {NUM_STEPS}; the resubmitted job resumed there")
    # Bit for bit the uninterrupted run's final state (on this cluster the SLURM processes compute like the
    # local ones, bitwise: see the test above).
    resumed, uninterrupted = _state(runs["slurm"], NUM_STEPS), _state(runs["local"], NUM_STEPS)
    assert _bitwise_equal(resumed, uninterrupted), _max_abs_diff(resumed, uninterrupted)
    resumed_metrics, uninterrupted_metrics = _metrics(runs["slurm"]), _metrics(runs["local"])
    assert [m["query_loss"] for m in resumed_metrics] == [m["query_loss"] for m in uninterrupted_metrics]
