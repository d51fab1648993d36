"""Start-up of JAX's multi-controller runtime: one Python process per host (or per GPU).

`initialize()` calls `jax.distributed.initialize` when the run has several processes: under a cluster JAX
recognises (SLURM, Cloud TPU pod, Open MPI, Kubernetes) or when the coordinator address, the number of
processes and this process's id are given (flags or the environment variables below). A single-process run
skips it. It must run before anything touches JAX devices.

Failure behaviour of jax 0.10.2 (tests/test_multiprocess.py): when a process dies, the coordination service notices
the missing heartbeats and terminates every other process with "Terminating process because the JAX
distributed service detected fatal errors ... another task died" within `heartbeat_timeout_s`; when process 0
(the coordinator) dies, the others terminate at once. A coordinator that never comes up ends the other
processes after `timeout_s` with a DistributedError (checked here, before JAX aborts the process). A
coordinator port already taken on process 0's machine makes jaxlib log "Failed to add port to server" and
then segfault or raise "Failed to start RPC server" (either, from one try to the next), without naming the
port; when the holder is another run's coordinator, both services share the port and the other run
crashes. Process 0 therefore checks the port first (`check_coordinator_port`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import sys
import time
from collections.abc import Mapping

import jax

# Environment variables equivalent to the CLI flags (JAX itself reads JAX_COORDINATOR_ADDRESS too).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Where process 0's coordination service listens (read by JAX; default "[::]:PORT", every interface).
ENV_BIND_ADDRESS = "JAX_COORDINATOR_BIND_ADDRESS"


_timeout_s: float = 300.0  # Set by initialize(); the default wait of barrier().
_barrier_count = 0


class DistributedError(RuntimeError):
    """The multi-process runtime cannot start: bad settings, or the coordinator is unreachable."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins the run; None fields are filled in by JAX from the detected cluster."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    cluster: str | None  # Name of the cluster environment JAX detected ("slurm", "gcetpu", ...), if any.


def use_cpu_devices(count: int, environ: dict[str, str] | None = None) -> None:
    """Makes the CPU backend expose `count` devices (one per core, say), so a CPU-only machine shards tasks
    over its cores like over accelerators. Must run before JAX starts its backends (checked).

    Sets --xla_force_host_platform_device_count in XLA_FLAGS for this process only; 0 leaves JAX's default.
    """
    if count < 0:
        raise DistributedError(f"--cpu_devices must be >= 0, got {count}")
    if count == 0:
        return
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise DistributedError("--cpu_devices must be applied before JAX starts (its backends already exist)")
    environ = os.environ if environ is None else environ
    flags = [
        f for f in environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    ]
    environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a SLURM or container limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def auto_cpu_devices(meta_batch_size: int, cores: int, environ: Mapping[str, str] | None = None) -> int:
    """CPU devices for a run that did not ask for a number (`--cpu_devices=-1`): one per usable core.

    The most devices <= `cores` that divide the meta-batch; 0 (JAX's default) where XLA_FLAGS already sets
    a device count, or for a multi-process run (each process's devices are its own business there).
    On a machine with accelerators the extra CPU devices are created but unused.
    """
    environ = os.environ if environ is None else environ
    if "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", ""):
        return 0
    count = max((d for d in range(1, max(cores, 1) + 1) if meta_batch_size % d == 0), default=1)
    return count if count > 1 else 0


def _cluster_value(cluster: str, method: str):
    """What JAX's cluster environment `cluster` reports through `method` (None if unknown before start-up)."""
    try:
        from jax._src import clusters

        for env in clusters.ClusterEnv._cluster_types:
            if (env.name or env.__name__) == cluster:
                return getattr(env, method)()
    except Exception:
        pass
    return None


def start_line(settings: Settings) -> str:
    """What is known before connecting: the process id and count, from the flags or the cluster's
    environment, and the coordinator; unknown parts are left out rather than printed as '?'."""
    pid, count, address = settings.process_id, settings.num_processes, settings.coordinator_address
    if settings.cluster is not None:
        pid = pid if pid is not None else _cluster_value(settings.cluster, "get_process_id")
        count = count if count is not None else _cluster_value(settings.cluster, "get_process_count")
    who = "this process"
    if pid is not None:
        who = f"process {pid}" + (f" of {count}" if count is not None else "")
    elif count is not None:
        who = f"one of {count} processes"
    source = f"from {settings.cluster}'s environment" if settings.cluster else "explicit settings"
    target = f"coordinator {address}" if address else "the coordinator the cluster names"
    return f"{who} ({source}): connecting to {target}"


def detect_cluster() -> tuple[str | None, int | None]:
    """The cluster environment JAX's auto-detection would use, and its process count (None, None if none).

    Uses the same registry and order as `jax.distributed.initialize` (opt-in methods such as mpi4py excluded).
    """
    try:
        # Private, but the only way to ask JAX what it would detect (jax is pinned <0.11).
        from jax._src import clusters
    except ImportError:  # pragma: no cover - layout changed in a newer jax
        return None, None
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        try:
            count = env.get_process_count()
        except Exception:  # Some environments only know their size after initialisation.
            count = None
        return env.name or env.__name__, count
    return None, None


def _int_setting(value: int | None, env_name: str, environ: Mapping[str, str], flag: str) -> int | None:
    if value is not None:
        return value
    raw = environ.get(env_name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(
            f"environment variable {env_name}={raw!r} (or --{flag}) must be an integer"
        ) from None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
    cluster: tuple[str | None, int | None] | None = None,
) -> Settings | None:
    """Decides whether this is a multi-process run (None: single process). Arguments win over the environment.

    Raises DistributedError naming the missing or invalid setting.
    """
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENV_COORDINATOR) or None
    count = _int_setting(num_processes, ENV_NUM_PROCESSES, environ, "num_processes")
    pid = _int_setting(process_id, ENV_PROCESS_ID, environ, "process_id")
    cluster_name, cluster_count = detect_cluster() if cluster is None else cluster
    if count == 1:
        return None
    given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
    if all(v is None for v in given.values()):
        if cluster_name is None or cluster_count == 1:
            return None
        return Settings(None, None, None, cluster_name)
    if cluster_name is None:
        env_names = {
            "coordinator_address": ENV_COORDINATOR,
            "num_processes": ENV_NUM_PROCESSES,
            "process_id": ENV_PROCESS_ID,
        }
        missing = [name for name, value in given.items() if value is None]
        if missing:
            flags_text = ", ".join(f"--{m} (or {env_names[m]})" for m in missing)
            raise DistributedError(
                f"multi-process settings are incomplete: missing {flags_text}; no cluster environment "
                "(SLURM, TPU pod, Open MPI, Kubernetes) was detected to fill them in"
            )
    if count is not None and count < 1:
        raise DistributedError(f"--num_processes = {count}: expected an integer >= 1")
    if pid is not None and (pid < 0 or (count is not None and pid >= count)):
        raise DistributedError(f"--process_id = {pid}: expected 0 <= process_id < num_processes ({count})")
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(
                f"--coordinator_address = {address!r}: expected HOST:PORT, e.g. 10.0.0.1:1234"
            )
    return Settings(address, count, pid, cluster_name)


def wait_for_coordinator(address: str, timeout_s: float, poll_s: float = 0.25) -> None:
    """Blocks until a TCP connection to the coordinator succeeds; DistributedError after `timeout_s`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(poll_s, 1.0)):
                return
        except OSError as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"could not reach the coordinator (process 0) at {address} within {timeout_s:g} s "
                f"({last_error}); check that process 0 is running and the address is right, or raise "
                "--distributed_timeout_s"
            )
        time.sleep(poll_s)


def _bind_in_use(family: int, sockaddr: tuple) -> bool | None:
    """True if binding `sockaddr` fails with EADDRINUSE, False if it binds, None if unusable on this host."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # E.g. no IPv6.
        return None
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
        except OSError as e:
            return True if e.errno == errno.EADDRINUSE else None
    return False


def port_in_use(port: int, host: str = "::") -> bool:
    """Whether the coordination service would find `port` taken when it listens on `host` (all interfaces).

    Binds like gRPC (jaxlib 0.10.2 on Linux): "[::]:PORT" dual-stack, so a socket bound to the
    port on any local address (127.0.0.1, 0.0.0.0, ...) blocks it, listening or not; with SO_REUSEADDR, so
    a port left in TIME_WAIT by a finished run counts as free. Unlike gRPC, without SO_REUSEPORT: gRPC sets
    it and would share the port with another run's coordinator, which is exactly the clash to catch.
    """
    host = host.strip("[]")
    if host in ("", "::", "0.0.0.0"):
        # The dual-stack wildcard covers IPv4 too; IPv4's own wildcard where the host has no IPv6.
        for family, wildcard in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
            in_use = _bind_in_use(family, (wildcard, port))
            if in_use is not None:
                return in_use
        return False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # Not ours to judge: JAX reports an unresolvable bind address itself.
    return any(_bind_in_use(family, sockaddr) for family, _, _, _, sockaddr in infos)


def check_coordinator_port(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Process 0: DistributedError if the port its coordination service will bind here is taken.

    Only process 0 starts the service, and it binds `[::]:PORT` on its own machine whatever host the address
    names (a DNS or Kubernetes service name may not resolve to a local address); the others only connect.
    """
    environ = os.environ if environ is None else environ
    address = settings.coordinator_address
    if settings.process_id != 0 or address is None:
        return
    port = address.rpartition(":")[2]
    bind_address = environ.get(ENV_BIND_ADDRESS) or f"[::]:{port}"
    bind_host, _, bind_port = bind_address.rpartition(":")
    if not bind_port.isdigit() or not port_in_use(int(bind_port), bind_host):
        return
    custom_bind = bool(environ.get(ENV_BIND_ADDRESS))
    raise DistributedError(
        f"coordinator {address}: port {bind_port} "
        + (f"({ENV_BIND_ADDRESS}={bind_address}) " if custom_bind else "")
        + "is already in use on this machine; another process, perhaps another run's coordinator, holds it "
        f"(`ss -ltnp 'sport = :{bind_port}'` shows which). Choose another port in --coordinator_address "
        f"(or {ENV_COORDINATOR})"
        + (f" and {ENV_BIND_ADDRESS}" if custom_bind else "")
        + " for every process; with launch/local.py, pass another --port or leave it out to get a free one"
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> bool:
    """Joins the multi-process run if there is one; returns True if `jax.distributed` was initialised.

    Args:
      timeout_s: how long to wait for the coordinator and for all processes to connect; also how long a
        finishing process waits for the others at shutdown.
      heartbeat_timeout_s: after this long without heartbeats a process is declared dead and all the others
        are terminated (so a crash never leaves the survivors hanging in a collective).
    """
    global _timeout_s
    settings = resolve(coordinator_address, num_processes, process_id)
    if settings is None:
        return False
    _timeout_s = float(timeout_s)
    if jax.distributed.is_initialized():
        return True
    # Cross-process collectives on CPU: gloo is jax 0.10's default; set it in case a user switched it off.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = settings.cluster or "explicit settings"
    print(f"[distributed] {start_line(settings)}, timeout {timeout_s} s", file=sys.stderr, flush=True)
    if settings.coordinator_address is not None and settings.process_id not in (None, 0):
        # JAX aborts the process (no Python exception) when the coordinator is unreachable; check first.
        wait_for_coordinator(settings.coordinator_address, timeout_s)
    check_coordinator_port(settings)  # jaxlib may segfault on a taken port, and never names it.
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=int(timeout_s),
            heartbeat_timeout_seconds=int(heartbeat_timeout_s),
            shutdown_timeout_seconds=int(timeout_s),
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise DistributedError(f"jax.distributed.initialize failed ({where}): {e}") from e
    return True


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process reaches the barrier `name` (a no-op for one process).

    Uses the coordination service, not a device collective, so it works before any collective has run.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # The client's barrier has no public wrapper.

    global _barrier_count
    _barrier_count += 1
    timeout_s = _timeout_s if timeout_s is None else timeout_s
    try:
        jax_distributed.global_state.client.wait_at_barrier(
            f"imaml:{_barrier_count}:{name}", int(timeout_s * 1000)
        )
    except Exception as e:  # jaxlib raises its own runtime error type.
        raise DistributedError(
            f"process {jax.process_index()}: not every process reached '{name}' within {timeout_s:g} s "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); another process is slow or "
            "died (see its log), or raise --distributed_timeout_s"
        ) from e


class SynchronizedFirstCall:
    """Wraps a jitted step: its first call compiles on every process, then all meet at a barrier and run it.

    Why: on CPU, gloo creates a communicator at the first collective and gives up when the processes arrive
    more than 30 s apart (hard-coded in jaxlib 0.10.2: "Gloo context initialization failed: GetKeyValue()
    timed out"). Compile times differ across processes, e.g. when only process 0 finds the step in the
    persistent compilation cache (only process 0 writes it). Later calls are not delayed (the communicator
    is reused; a 45 s skew at the second collective was fine).
    """

    def __init__(self, fn, name: str):
        self._fn = fn
        self._name = name
        self._synchronized = False

    def __call__(self, *args):
        if not self._synchronized:
            self._fn.lower(*args).compile()  # Cached: the call below reuses this executable.
            barrier(f"{self._name} compiled")
            self._synchronized = True
        return self._fn(*args)

    def __getattr__(self, attr):
        return getattr(self._fn, attr)


def synchronize_first_call(fn, name: str):
    """`fn` itself for a single process; else a SynchronizedFirstCall around it."""
    return fn if jax.process_count() == 1 else SynchronizedFirstCall(fn, name)
