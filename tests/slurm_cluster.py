#!/usr/bin/env python3
"""A one-node SLURM cluster on this machine (munged + slurmctld + slurmd on 127.0.0.1), for tests and trials.

Needs Debian's `slurm-wlm` and `munge` packages and root (slurmd runs job steps as their user). Everything lives
in one directory: slurm.conf, a fresh munge key and socket, state, spool and logs; nothing in /etc is read or
written, and the daemons listen on ports picked free at start. Clients find the cluster through SLURM_CONF:

    python3 tests/slurm_cluster.py start /tmp/imaml-slurm     # prints: export SLURM_CONF=/tmp/imaml-slurm/slurm.conf
    export SLURM_CONF=/tmp/imaml-slurm/slurm.conf
    CONFIG=configs/smoke.py WORKDIR=/tmp/imaml-slurm/run sbatch --nodes=1 --ntasks-per-node=2 \\
        --gpus-per-node=0 --cpus-per-task=1 --output=/tmp/imaml-slurm/%j.out launch/slurm.sbatch
    python3 tests/slurm_cluster.py stop /tmp/imaml-slurm      # cancels its jobs, stops the daemons

The node is `NodeName=<hostname> NodeAddr=127.0.0.1 CPUs=<nproc>` (at least 2 CPUs, so a 2-task job fits on
any machine), with proctrack/linuxproc, task/none and select/cons_tres: no cgroups or systemd needed, so it
runs in a container. tests/test_slurm.py uses `LocalCluster` directly; a watchdog process stops the cluster
(jobs, daemons, and any job process left over) if the test process dies without stopping it. Standard
library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

DAEMONS = ("munged", "slurmctld", "slurmd")  # Start order; stopped in reverse.
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


class ClusterError(RuntimeError):
    """The cluster could not be started (the message has the daemons' log tails)."""


def missing_programs() -> list[str]:
    """The SLURM and munge programs this module needs that are not on PATH (sbin included)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p, path=path) is None]


def _program(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise ClusterError(f"{name} is not installed (Debian: apt-get install slurm-wlm munge)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_name() -> str:
    """This host's short name if it resolves (JAX connects to the first node's name), else 'localhost'."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


def running_cluster(env: dict[str, str] | None = None, timeout_s: float = 10) -> bool:
    """Whether a controller answers with the configuration this environment names (SLURM_CONF or /etc/slurm)."""
    env = dict(os.environ if env is None else env)
    if not (env.get("SLURM_CONF") or os.path.exists("/etc/slurm/slurm.conf")):
        return False  # Without a config the clients look up DNS SRV records (configless SLURM).
    if shutil.which("scontrol") is None:
        return False
    try:
        proc = subprocess.run(
            ["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and " is UP" in proc.stdout


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn: SIGTERM this child when the process that started it exits (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Clients:
    """SLURM's client commands (sbatch, squeue, ...) run with `env` added to the environment."""

    name = ""  # The node jobs run on, where known.

    def __init__(self, env: dict[str, str] | None = None):
        self._env = dict(env or {})

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, ...) needs in its environment to talk to this cluster."""
        return dict(self._env)

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), **self.env}

    def run_client(self, args: list[str], check: bool = True, timeout_s: float = 30, **kwargs):
        """Runs a SLURM client command (sbatch, squeue, ...) against this cluster."""
        env = kwargs.pop("env", None)
        return subprocess.run(
            args,
            env=self.client_env(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=check,
            **kwargs,
        )

    def log_tails(self, lines: int = 15) -> str:
        return ""


class LocalCluster(Clients):
    """munged, slurmctld and slurmd in the foreground, children of this process, configured in `directory`."""

    def __init__(self, directory: str, cpus: int | None = None, name: str | None = None):
        self.directory = os.path.abspath(directory)
        self.name = name or node_name()
        self.cpus = max(2, cpus or os.cpu_count() or 1)
        self.conf = os.path.join(self.directory, "slurm.conf")
        super().__init__({"SLURM_CONF": self.conf})
        self.procs: dict[str, subprocess.Popen] = {}
        self.watchdog: subprocess.Popen | None = None

    # --- Configuration ---

    def _path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def write_config(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for sub in ("state", "spool", "log"):
            os.makedirs(self._path(sub), exist_ok=True)
        os.makedirs(self._path("munge-key"), mode=0o700, exist_ok=True)
        os.makedirs(self._path("munge"), mode=0o755, exist_ok=True)  # The socket's folder: open to all users.
        key = self._path("munge-key", "munge.key")
        if not os.path.exists(key):
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(128))  # munge's own default key size (1024 bits).
        ctld_port, slurmd_port = _free_port(), _free_port()
        lines = [
            "# One-node test cluster written by tests/slurm_cluster.py",
            "ClusterName=imaml-local",
            f"SlurmctldHost={self.name}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self._path('munge', 'munge.socket')}",
            f"StateSaveLocation={self._path('state')}",
            f"SlurmdSpoolDir={self._path('spool')}",
            f"SlurmctldPidFile={self._path('slurmctld.pid')}",
            f"SlurmdPidFile={self._path('slurmd.pid')}",
            f"SlurmctldLogFile={self._path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._path('log', 'slurmd.log')}",
            "ProctrackType=proctrack/linuxproc",  # No cgroups: works in a container without systemd.
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SlurmdParameters=config_overrides",  # The node is what this file says, whatever slurmd detects.
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=30",  # scancel: SIGTERM, then SIGKILL 30 s later (SLURM's default).
            "MinJobAge=600",  # Finished jobs stay visible to `scontrol show job` for 10 minutes.
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.name} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=local Nodes={self.name} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    # --- Daemons ---

    def _commands(self) -> dict[str, list[str]]:
        return {
            "munged": [
                _program("munged"),
                "--foreground",
                "--force",  # Root, and folders under /tmp: munged would otherwise refuse.
                f"--socket={self._path('munge', 'munge.socket')}",
                f"--key-file={self._path('munge-key', 'munge.key')}",
                f"--pid-file={self._path('munge', 'munged.pid')}",
                f"--log-file={self._path('log', 'munged.log')}",
                f"--seed-file={self._path('munge-key', 'munged.seed')}",
            ],
            "slurmctld": [_program("slurmctld"), "-D", "-f", self.conf],
            "slurmd": [_program("slurmd"), "-D", "-f", self.conf, "-N", self.name],
        }

    def start(self, timeout_s: float = 60, detach: bool = False) -> None:
        """Starts the daemons and waits until the node is idle; ClusterError (with the logs) otherwise.

        detach: the cluster runs until `stop DIRECTORY` (the command line); else a watchdog stops it when this
        process exits without calling stop().
        """
        if os.geteuid() != 0:
            raise ClusterError("starting a SLURM cluster needs root (slurmd runs job steps as their user)")
        self.write_config()
        commands = self._commands()  # ClusterError first if a program is missing.
        deadline = time.monotonic() + timeout_s
        try:
            for name in DAEMONS:
                with open(self._path("log", f"{name}.stdout"), "ab") as log:
                    self.procs[name] = subprocess.Popen(
                        commands[name],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self.directory,
                        env={**os.environ, **self.env},
                        start_new_session=True,  # A Ctrl-C in the terminal reaches the test, not the daemons.
                    )
                self._write_pids()
                if name == "munged":
                    self._wait(lambda: os.path.exists(self._path("munge", "munge.socket")), deadline, name)
                elif name == "slurmctld":
                    self._wait(lambda: running_cluster(self.client_env(), timeout_s=5), deadline, name)
            if not detach:
                with open(self._path("log", "watchdog.log"), "ab") as log:
                    self.watchdog = subprocess.Popen(
                        [
                            sys.executable,
                            os.path.abspath(__file__),
                            "watch",
                            self.directory,
                            str(os.getpid()),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            self._wait(self._node_idle, deadline, "slurmd (node idle)")
        except BaseException:
            self.stop()
            raise

    def _write_pids(self) -> None:
        with open(self._path("daemons.pid"), "w") as f:
            f.write("".join(f"{name} {proc.pid}\n" for name, proc in self.procs.items()))

    def _node_idle(self) -> bool:
        out = self.run_client(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout_s=10).stdout
        return any(line.split()[:2] == [self.name, "idle"] for line in out.splitlines())

    def _wait(self, ready, deadline: float, what: str) -> None:
        while not ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead:
                raise ClusterError(
                    f"{', '.join(dead)} exited (code {self.procs[dead[0]].returncode}) while waiting for {what}"
                    f"\n{self.log_tails()}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}\n{self.log_tails()}")
            time.sleep(0.2)

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        log_dir = self._path("log")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                tail = f.readlines()[-lines:]
            parts.append(f"--- {name} (last {len(tail)} lines)\n{''.join(tail)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancels the jobs, stops the daemons (slurmd first), then ends any job process left over."""
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()  # Not needed any more: this process stops the cluster itself.
            self.watchdog.wait(timeout=10)
        shutdown(self.directory, dict(self.procs), verbose=False)
        self.procs.clear()


def _pid_alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _terminate(pid: int, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if `pid` is still alive after `timeout_s`."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid, proc) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _pid_alive(pid, proc):
            return


def job_processes(conf: str) -> list[int]:
    """Processes of this cluster's jobs still alive: slurmstepd and the job's own processes, recognised by the
    SLURM_CONF the cluster's daemons and jobs carry in their environment (never this process or its parents)."""
    own = {os.getpid(), os.getppid()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in own:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # Gone, or a kernel thread.
            continue
        if f"SLURM_CONF={conf}".encode() not in environ:
            continue
        if cmdline.startswith(b"slurmstepd") or any(v.startswith(b"SLURM_JOB_ID=") for v in environ):
            found.append(int(entry))
    return found


def shutdown(
    directory: str,
    procs: dict[str, subprocess.Popen] | None = None,
    timeout_s: float = 20,
    verbose: bool = True,
) -> None:
    """Stops the cluster of `directory`: cancels its jobs (SIGTERM, SIGKILL after KillWait), stops its daemons
    by the ids it recorded (or `procs`, this process's children), then SIGKILLs any job process left over."""
    cluster = LocalCluster(directory)
    if running_cluster(cluster.client_env(), timeout_s=5):
        with contextlib.suppress(Exception):
            cluster.run_client(["scancel", "--partition=local"], check=False, timeout_s=15)
            deadline = time.monotonic() + 45  # KillWait (30 s) and some.
            while time.monotonic() < deadline:
                out = cluster.run_client(["squeue", "-h", "-o", "%i"], check=False, timeout_s=15).stdout
                if not out.strip():
                    break
                time.sleep(0.5)
    pids: list[tuple[str, int]] = []
    pid_file = cluster._path("daemons.pid")
    if os.path.exists(pid_file):
        with open(pid_file) as f:
            pids = [(line.split()[0], int(line.split()[1])) for line in f if line.strip()]
    procs = procs or {}
    for name, pid in reversed(pids):
        _terminate(pid, procs.get(name), timeout_s)
        if verbose:
            print(f"stopped {name} (pid {pid})", flush=True)
    for pid in job_processes(cluster.conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if verbose:
            print(f"killed job process {pid}", flush=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(pid_file)


def _watch(directory: str, owner: int) -> None:
    """Waits for process `owner`, this one's parent, to exit, then stops the cluster (it did not: killed, say)."""
    while os.getppid() == owner:  # Once the owner is gone, this process has another parent (init).
        time.sleep(1)
    print(f"process {owner} exited without stopping the cluster: stopping it", flush=True)
    shutdown(directory)


def main(argv: list[str]) -> int:
    usage = "usage: slurm_cluster.py start DIRECTORY | stop DIRECTORY"
    if len(argv) == 3 and argv[0] == "watch":  # Started by LocalCluster.start().
        _watch(argv[1], int(argv[2]))
        return 0
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(usage, file=sys.stderr)
        return 2
    command, directory = argv
    cluster = LocalCluster(directory)
    if command == "stop":
        if not os.path.exists(cluster._path("daemons.pid")):
            print(f"error: no cluster is running in {directory}", file=sys.stderr)
            return 1
        shutdown(directory)
        return 0
    if os.path.exists(cluster._path("daemons.pid")):
        print(f"error: a cluster was started in {directory} already; stop it first", file=sys.stderr)
        return 1
    try:
        cluster.start(detach=True)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"node {cluster.name} ({cluster.cpus} CPUs) is up; logs in {cluster._path('log')}", file=sys.stderr)
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
