"""Compile and run timing with warm-up and repetitions, and a description of the machine."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls after warm-up: median, min, max and every sample."""

    median: float
    min: float
    max: float
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples), tuple(samples))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compile_timed(jitted, *args) -> tuple[Any, float]:
    """`jitted.lower(*args).compile()` and its wall-clock seconds (tracing, lowering and XLA compilation)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_calls(
    fn: Callable[..., Any],
    make_args: Callable[[], tuple] = tuple,
    *,
    reps: int,
    warmup: int = 1,
    budget_s: float = float("inf"),
    min_reps: int = 2,
) -> tuple[Timing, Any]:
    """Times `fn(*make_args())` until its outputs are ready: `warmup` untimed calls, then `reps` timed ones.

    Stops early once `budget_s` seconds of timed calls have run and `min_reps` were taken (for the slowest
    configurations). Arguments are made outside the timed region (a donated state needs a fresh copy).
    Returns the timing and the last call's output.
    """
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*make_args()))
    samples: list[float] = []
    while len(samples) < reps and (len(samples) < min_reps or sum(samples) < budget_s):
        args = jax.block_until_ready(make_args())
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return Timing.of(samples), out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, devices and library versions, for the header of the results."""
    devices = jax.devices()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(
        cpu=_cpu_model(),
        cpu_cores=os.cpu_count(),
        cpu_cores_usable=usable,
        memory_gib=_memory_gib(),
        platform=devices[0].platform,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        python=platform.python_version(),
        jax=jax.__version__,
        jaxlib=_version("jaxlib"),
        jaxopt=_version("jaxopt"),
        flax=_version("flax"),
        optax=_version("optax"),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_average_start=load_average(),
    )
