#!/usr/bin/env python3
"""Starts N trainer processes on this machine (coordinator on 127.0.0.1), M CPU or GPU devices each.

    python launch/local.py --num_processes 2 --devices_per_process 2 -- \\
        --config=configs/smoke.py --workdir=/tmp/imaml-2proc

Everything after `--` goes to `python -m trainer.main`; the launcher adds --coordinator_address,
--num_processes and --process_id. Each output line is prefixed with `[process i]`. If a process fails, the
launcher terminates the others, names the failed process, and exits with its exit code (128 + signal number
when it was killed by a signal). Use it to test multi-process runs without a cluster; see launch/README.md. A --port already
in use on this machine is an error (exit 1) before any process starts.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bind_all_interfaces(port: int) -> int:
    """Binds `port` (0: any) on every interface, as process 0's coordination service will; returns the port.

    IPv6 dual-stack, or IPv4 where the host has no IPv6; SO_REUSEADDR (a port in TIME_WAIT is free) but not
    SO_REUSEPORT (gRPC's, which would let another run's coordinator share the port). Raises OSError, EADDRINUSE
    when the port is taken. The test of trainer.distributed.port_in_use, here so the launcher needs no JAX.
    """
    error: OSError | None = None
    for family, wildcard in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind((wildcard, port))
                return sock.getsockname()[1]
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise
            error = e  # This family is unusable here; try the next.
    assert error is not None
    raise error


def free_port() -> int:
    """A TCP port that was free on every interface a moment ago (the OS picks it)."""
    return _bind_all_interfaces(0)


def port_in_use(port: int) -> bool:
    """Whether the coordinator could not listen on `port` because another socket holds it."""
    try:
        _bind_all_interfaces(port)
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    return False


def process_env(
    base: dict[str, str], platform: str, process_id: int, devices_per_process: int
) -> dict[str, str]:
    """The environment of process `process_id`: its own simulated CPU devices or its own slice of the GPUs."""
    env = dict(base)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"  # Lines reach the launcher (and the user) as they are printed.
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
    else:
        first, end = process_id * devices_per_process, (process_id + 1) * devices_per_process
        visible = env.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(end)]
        mine = gpus[first:end]
        if len(mine) < devices_per_process:
            raise SystemExit(
                f"launch: process {process_id} needs GPUs {first}..{end - 1} of "
                f"CUDA_VISIBLE_DEVICES={visible}"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return env


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
    stream.close()


def terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to each live process group, then SIGKILL to those still alive after `grace_s`."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch(
    num_processes: int,
    devices_per_process: int,
    trainer_args: list[str],
    *,
    platform: str = "cpu",
    port: int = 0,
    grace_s: float = 10.0,
    out=None,
) -> int:
    """Runs the processes to completion; returns 0 if all succeeded, else the first failure's exit status."""
    out = out or sys.stdout
    if port and port_in_use(port):
        # Checked before starting anything: process 0 would segfault in jaxlib ("Failed to add port to server").
        raise SystemExit(
            f"launch: error: coordinator port {port} is already in use on this machine (another process, "
            "perhaps another run, holds it); pass another --port, or leave --port out to get a free one"
        )
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    print(
        f"launch: {num_processes} processes x {devices_per_process} {platform} device(s), "
        f"coordinator {address}",
        file=out,
        flush=True,
    )
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for i in range(num_processes):
        cmd = [
            sys.executable,
            "-m",
            "trainer.main",
            *trainer_args,
            f"--coordinator_address={address}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
        ]
        # Own session: the launcher alone decides when to stop its processes (and their children).
        proc = subprocess.Popen(
            cmd,
            env=process_env(dict(os.environ), platform, i, devices_per_process),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        procs.append(proc)
        print(f"launch: process {i} pid {proc.pid}", file=out, flush=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[process {i}] ", out), daemon=True)
        pump.start()
        pumps.append(pump)

    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [(i, p) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                break
            time.sleep(0.2)
        failed = [(i, p) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            i, p = failed[0]
            survivors = [j for j, q in enumerate(procs) if q.poll() is None]
            message = f"launch: process {i} (pid {p.pid}) {describe_exit(p.returncode)}"
            if survivors:
                message += f"; terminating process(es) {', '.join(map(str, survivors))}"
            print(message, file=out, flush=True)
            terminate(procs, grace_s)
            status = p.returncode if p.returncode > 0 else 128 - p.returncode
    except KeyboardInterrupt:
        print("launch: interrupted; terminating all processes", file=out, flush=True)
        terminate(procs, grace_s)
        status = 130
    for pump in pumps:
        pump.join(timeout=5)
    if status == 0:
        print(f"launch: all {num_processes} processes finished", file=out, flush=True)
    else:
        print(f"launch: failed (exit status {status})", file=out, flush=True)
    return status


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, trainer_args = argv[:split], argv[split + 1 :]
    else:
        own, trainer_args = argv, []
    parser = argparse.ArgumentParser(
        description=__doc__,
        usage="%(prog)s [options] -- TRAINER_FLAGS",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--num_processes", type=int, default=2, help="Processes to start (default 2).")
    parser.add_argument(
        "--devices_per_process", type=int, default=1, help="Devices of each process (default 1)."
    )
    parser.add_argument(
        "--platform",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: simulated CPU devices; gpu: its own slice of CUDA_VISIBLE_DEVICES.",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="Coordinator port on 127.0.0.1 (default: a free one)."
    )
    parser.add_argument(
        "--grace_s",
        type=float,
        default=10.0,
        help="Seconds between SIGTERM and SIGKILL when stopping the other processes.",
    )
    args = parser.parse_args(own)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be >= 1")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected 1..65535, or 0 for a free one")
    if not trainer_args:
        parser.error(
            "no trainer flags: put them after `--`, e.g. -- --config=configs/smoke.py --workdir=/tmp/x"
        )
    # A SIGTERM to the launcher (e.g. from a job scheduler) stops the processes like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    return launch(
        args.num_processes,
        args.devices_per_process,
        trainer_args,
        platform=args.platform,
        port=args.port,
        grace_s=args.grace_s,
    )


if __name__ == "__main__":
    sys.exit(main())
