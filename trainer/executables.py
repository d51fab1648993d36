"""The compiled train step, saved next to the compilation cache so that a resumed run neither traces nor compiles it.

JAX's persistent compilation cache (`configure_jax`) skips XLA compilation on a resume, but not Python
tracing and lowering, which for the iMAML step (jaxopt's L-BFGS and its while loops) cost several times the cache
hit itself (benchmark section 5). As MaxText does with its `compiled_trainstep_file`, the step's executable is
serialised (`jax.experimental.serialize_executable`) after its first compilation and loaded at the next start
when its fingerprint matches. The fingerprint covers what decides the program: the trainer's source, the step's
config fields (`program_fields`), the versions of jax, jaxlib, jaxopt, optax, flax and numpy, the devices and
their platform version, the CPU, XLA flags, the JAX options that change lowering, and the shapes, dtypes and
shardings of the step's inputs. Any change compiles afresh (and saves under a new name).
`train_step_for_run` gives the loop its step callable; `configure_jax` makes the JAX settings a run needs
before any array exists (float64 when asked for, the persistent compilation cache in `cache_directory`).

Used for single-process runs with the `shard_map` or `none` backend; `pmap` and multi-process runs rely on the
compilation cache alone. Only a fresh compilation is saved (what JAX's own cache writes at that moment): an
executable that JAX read from its compilation cache re-serialises incompletely on XLA:CPU (jax 0.10.2: the file
loads, then fails with "Function ... not found" when run), so a run whose step came from a shared compilation
cache saves nothing and its resume reads that cache again. A file that cannot be loaded is reported, removed and
compiled again (it is a cache; no training state is in it). Loading an executable runs its code: like a pickle,
only load workdirs you trust.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.metadata
import json
import os
import pickle
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from jax.experimental import serialize_executable

from trainer import config as config_lib
from trainer import distributed, families, workdir

SUFFIX = ".jaxexe"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_PACKAGES = ("jax", "jaxlib", "jaxopt", "optax", "flax", "numpy")
# JAX options that change what a traced function lowers to (x64 changes dtypes; the others change HLO).
_JAX_OPTIONS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_numpy_rank_promotion",
)
_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_PLATFORMS")


def _source_digest() -> str:
    """SHA-256 of every module of the trainer package (a code change must not load an old program)."""
    digest = hashlib.sha256()
    package = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(package, "*.py"))):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cpu_description() -> str:
    """The host CPU's model and feature flags: XLA:CPU code is compiled for the features of the host."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _family_source_digest(config: ml_collections.ConfigDict) -> str:
    """SHA-256 of an imported task family's module ("" for the built-in ones, covered by _source_digest):
    its loss is traced into the step, so an edit must not load the old program."""
    if config.tasks.family in config_lib.FAMILIES:
        return ""
    module = sys.modules[families.family_class(config.tasks.family).__module__]
    with open(module.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _abstract(args: Any) -> str:
    """The inputs' tree structure, shapes, dtypes and shardings (what a compiled program is specialised to)."""
    leaves, treedef = jax.tree.flatten(args)
    return repr(treedef) + "".join(f"\n{x.shape} {x.dtype} {x.sharding}" for x in leaves)


def program_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields the train step's program depends on: those of the maths, the parallel layout and,
    for a decaying learning-rate schedule, the number of steps (so that extending a run with a constant
    schedule, or changing how often it evaluates, logs or checkpoints, loads the same executable)."""
    names = [
        *config_lib.maths_fields(config),
        *(name for name in config_lib.RULES if name.startswith("parallel.")),
    ]
    return {name: repr(functools.reduce(getattr, name.split("."), config)) for name in sorted(names)}


def fingerprint(config: ml_collections.ConfigDict, devices: list[jax.Device], args: Any) -> str:
    """Hex digest naming the program `jitted.lower(*args).compile()` gives for this config on these devices."""
    client = devices[0].client
    parts = {
        "source": _source_digest(),
        "family_source": _family_source_digest(config),
        "config": program_fields(config),
        "versions": {name: _version(name) for name in _PACKAGES},
        "platform": [client.platform, client.platform_version, jax.process_count(), jax.process_index()],
        "devices": [f"{d.id}:{d.device_kind}:{d.process_index}" for d in devices],
        "cpu": _cpu_description() if client.platform == "cpu" else "",
        "options": {name: str(getattr(jax.config, name, None)) for name in _JAX_OPTIONS},
        "env": {name: os.environ.get(name, "") for name in _ENV},
        "inputs": _abstract(args),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load(path: str, devices: list[jax.Device]) -> jax.stages.Compiled:
    with open(path, "rb") as f:
        serialized, in_tree, out_tree = pickle.load(f)
    return serialize_executable.deserialize_and_load(
        serialized, in_tree, out_tree, backend=devices[0].client, execution_devices=devices
    )


def _compile(jitted, args: tuple) -> tuple[jax.stages.Compiled, bool]:
    """`jitted.lower(*args).compile()`, and whether it came from JAX's persistent compilation cache.

    A second compile of the same jitted object in one process returns JAX's in-memory executable without any
    event, whatever its origin: callers pass a step built for this run (train.py builds a backend per run; a
    new backend's step misses the in-memory cache).
    """
    hits = []

    def listener(event: str, **kwargs) -> None:
        if event == _CACHE_HIT_EVENT:
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        compiled = jitted.lower(*args).compile()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    return compiled, bool(hits)


def _save(compiled: jax.stages.Compiled, path: str) -> None:
    """Writes atomically (a crash mid-write leaves no partial file under the final name)."""
    payload = pickle.dumps(serialize_executable.serialize(compiled))
    workdir.write_atomically(path, lambda f: f.write(payload))


def discard_entries_since(directory: str | None, since: float) -> list[str]:
    """Removes the files but saved executables (written atomically) put in `directory` since `since`.

    After a write failed there (a full disk), those may be partial: JAX's compilation cache writes its
    entries in place, and a partial entry would be read, rejected with a warning, and rewritten by every
    later run. Dropping them costs one compilation.
    """
    removed = []
    for path in glob.glob(os.path.join(directory, "*")) if directory else []:
        try:
            if not path.endswith(SUFFIX) and os.path.isfile(path) and os.path.getmtime(path) >= since:
                os.remove(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def load_or_compile(
    jitted,
    args: tuple,
    directory: str,
    key: str,
    devices: list[jax.Device],
    log: Callable[[str], None] = print,
) -> tuple[Callable[..., Any], str, float]:
    """`jitted.lower(*args).compile()`, or the executable saved under `key` in `directory` by an earlier run.

    Returns (the compiled step, "loaded" or "compiled", seconds it took). After a fresh compilation the
    executable is saved there; a failure to save is reported and training goes on. A file that cannot be
    loaded is reported and removed.
    """
    path = os.path.join(directory, f"train_step_{key[:32]}{SUFFIX}")
    start = time.perf_counter()
    if os.path.exists(path):
        try:
            compiled = _load(path, devices)
            seconds = time.perf_counter() - start
            log(f"train step: loaded its compiled executable from {path} ({seconds:.2f} s)")
            return compiled, "loaded", seconds
        except Exception as error:  # A damaged or foreign file: say so, then compile as if it were absent.
            log(f"train step: cannot load {path} ({type(error).__name__}: {error}); removed, compiling again")
            os.remove(path)
            start = time.perf_counter()
    compiled, from_cache = _compile(jitted, args)
    seconds = time.perf_counter() - start
    if from_cache:
        log(
            f"train step: compiled in {seconds:.1f} s from JAX's compilation cache; not saved (an executable read "
            "from that cache does not serialise whole on XLA:CPU: it would fail when run)"
        )
        return compiled, "compiled", seconds
    try:
        os.makedirs(directory, exist_ok=True)
        _save(compiled, path)
        log(f"train step: compiled in {seconds:.1f} s; executable saved to {path} for resumed runs")
    except Exception as error:  # E.g. an executable with constants JAX cannot serialise, a read-only disk.
        log(f"train step: compiled in {seconds:.1f} s; not saved ({type(error).__name__}: {error})")
    return compiled, "compiled", seconds


def cache_directory(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """Where the run keeps compiled programs: `compile_cache_dir`, <workdir>/jax_cache by default; None when
    it is "none"."""
    if config.compile_cache_dir == "none":
        return None
    return os.path.abspath(config.compile_cache_dir or os.path.join(workdir, "jax_cache"))


def configure_jax(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Global JAX settings the config needs; must run before any array is created."""
    if config.model.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    cache_dir = None if workdir is None else cache_directory(config, workdir)
    if cache_dir is not None and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        # Cache only programs worth it (the train step and evaluation take seconds to compile).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train_step_for_run(
    backend, config: ml_collections.ConfigDict, workdir: str, state, task_batch, log=print
) -> tuple[Callable[..., Any], str, float]:
    """The callable the train loop steps with (the one place it is chosen): a saved or freshly saved
    executable where supported; else the backend's jitted step (compiled at its first call; source "jit",
    0 seconds), which with several processes first waits until every process has compiled it."""
    directory = cache_directory(config, workdir)
    if jax.process_count() > 1:
        return distributed.synchronize_first_call(backend.step, f"{backend.name} train step"), "jit", 0.0
    if directory is None or backend.name == "pmap":
        return backend.step, "jit", 0.0
    args = (state, task_batch)
    key = fingerprint(config, backend.devices, args)
    return load_or_compile(backend.step, args, directory, key, backend.devices, log)
