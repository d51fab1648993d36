"""Command-line entry point: `python -m trainer.main --config=configs/sinusoid.py --workdir=DIR`.

Kept short on purpose: it parses flags, validates the config and calls `train.train_and_evaluate`.
Config fields are overridden with `--config.<group>.<field>=value`.
Rerunning the same command on the same workdir resumes from its latest checkpoint.
Exit status: 0 done; 1 error; 2 invalid config or flags (one line on stderr); 75 stopped by SIGTERM/SIGINT
after saving a checkpoint.
"""

from __future__ import annotations

import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from trainer import workdir  # No JAX import: its signal handlers come first (run()).

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even if fields that change the maths differ from the saved config."
)
_RESTORE_STEP = flags.DEFINE_integer(
    "restore_step",
    None,
    "Resume from this checkpoint step instead of the latest; later steps are moved to "
    "<workdir>/checkpoints_superseded.",
)
_INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Warm start: OTHER_WORKDIR[:STEP] (default: its latest checkpoint); a fresh run starts from that run's "
    "meta-parameters with a fresh optimizer at step 0 (sets config field train.init_from).",
)
_PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps",
    None,
    "START:END: write a jax.profiler trace of the steps logged as START+1..END to "
    "<workdir>/tensorboard/plugins/profile (TensorBoard's Profile tab).",
)
# Multi-process runs (launch/README.md); under SLURM, a TPU pod, Open MPI or Kubernetes JAX fills these in.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator (or env JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..N-1 (or JAX_PROCESS_ID).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds to wait for the coordinator and all processes to connect."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "Seconds without heartbeats after which a process counts as dead and the others are terminated.",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    -1,
    "On a machine without accelerators: expose this many CPU devices so that the meta-batch is sharded over "
    "the cores; -1 (default): one per usable core, as many as divide train.meta_batch_size, in a "
    "single-process run; 0 keeps JAX's single CPU device.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _stopped_in_start_up() -> int | None:
    """The preempted status if SIGTERM/SIGINT arrived during start-up (nothing to save yet)."""
    if workdir.StartupSignals.received is None:
        return None
    print(
        f"preempted: {workdir.StartupSignals.received} during start-up, nothing to save; run the same "
        "command to start",
        file=sys.stderr,
    )
    return workdir.PREEMPTED_EXIT_STATUS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
    from trainer import config as config_lib

    config = _CONFIG.value
    if _INIT_FROM.value is not None:
        config.train.init_from = _INIT_FROM.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: invalid config {flags.FLAGS['config'].config_filename}: {e}", file=sys.stderr)
        return 2
    try:
        profile_steps = parse_profile_steps(_PROFILE_STEPS.value)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trainer import distributed

    try:  # Before anything touches JAX devices.
        settings = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        cpu_devices = _CPU_DEVICES.value
        if cpu_devices == -1:
            cpu_devices = (
                0
                if settings
                else distributed.auto_cpu_devices(config.train.meta_batch_size, distributed.usable_cores())
            )
        distributed.use_cpu_devices(cpu_devices)
        distributed.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            timeout_s=_DISTRIBUTED_TIMEOUT.value,
            heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
        )
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from trainer import checkpointing, executables, omniglot, train

    stopped = _stopped_in_start_up()  # Later signals reach train's PreemptionWatcher (or JAX's notifier).
    if stopped is not None:
        return stopped
    started = time.time()
    try:
        train.train_and_evaluate(
            config,
            _WORKDIR.value,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
            restore_step=_RESTORE_STEP.value,
            profile_steps=profile_steps,
        )
    except (
        config_lib.ConfigError,
        checkpointing.CheckpointError,
        train.NonFiniteError,
        distributed.DistributedError,
        workdir.WorkdirLockedError,
        omniglot.OmniglotError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except checkpointing.Preempted as e:  # A distinct status: schedulers and scripts rerun the command.
        print(f"preempted: {e}", file=sys.stderr)
        return checkpointing.PREEMPTED_EXIT_STATUS
    except Exception as e:  # A full, read-only or forbidden disk is one line; anything else a bug.
        message = workdir.environment_error(e)
        if message is None:
            raise
        # Entries of the compilation cache written since the start may be partial.
        executables.discard_entries_since(executables.cache_directory(config, _WORKDIR.value), started)
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


def parse_profile_steps(value: str | None) -> tuple[int, int] | None:
    """ "START:END" (0 <= START < END) -> (START, END); None stays None. Raises ConfigError."""
    from trainer import config as config_lib

    if value is None or value == "":
        return None
    start, _, end = value.partition(":")
    if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise config_lib.ConfigError(
            f"--profile_steps={value}: expected START:END with 0 <= START < END (e.g. 10:15 traces the "
            "steps logged as 11 to 15)"
        )
    return int(start), int(end)


def _missing_config_file(argv: list[str]) -> str | None:
    """An error message when --config names no file (ml_collections reports it only later, as a traceback)."""
    import os

    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg[len("--config=") :].split(":", 1)[0]
            if not os.path.isfile(path):
                return f"--config={path}: no such file (run from the repository root, or give its full path)"
    return None


def _config_argument(argv: list[str]) -> str:
    """What --config names: the file and the argument after its ':'."""
    return next((a[len("--config=") :] for a in argv[1:] if a.startswith("--config=")), "--config")


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.<field>=...` naming no config field, as an error message (None if all are known)."""
    from trainer import config as config_lib

    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        name = arg[len("--config.") :].split("=", 1)[0]
        if not config_lib.known_field(name):
            group = name.rpartition(".")[0]
            known = sorted(f for f in config_lib.RULES if f.rpartition(".")[0] == group) or sorted(
                config_lib.RULES
            )
            return f"unknown config field '{name}' (from {arg.split('=', 1)[0]}); known fields: {known}"
    return None


def _unknown_option(argv: list[str], error: Exception) -> str | None:
    """The message for a `--config.tasks.options.<name>` the config's family does not declare (ml_collections
    raises AttributeError naming only the key)."""
    if not isinstance(error, (AttributeError, KeyError)):
        return None
    for arg in argv[1:]:
        name = arg[len("--config.") :].split("=", 1)[0] if arg.startswith("--config.tasks.options.") else ""
        if name and name.rpartition(".")[2] in str(error):
            suggestion = re.search(r'Did you mean "(\w+)"', str(error))
            hint = f"; did you mean tasks.options.{suggestion.group(1)}?" if suggestion else ""
            return (
                f"unknown config field '{name}' (from --config.{name}): the config's tasks.family declares no "
                f"such option (an imported family's default_options; the built-in families have none){hint}"
            )
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every user error as one line on stderr and exit status 2 (no traceback):
    an unknown config field, a value of the wrong type, a missing or broken config file, a bad argument of
    the config file (`--config=configs/omniglot.py:ways=x`), a missing flag."""
    message = _missing_config_file(argv) or _unknown_override(argv)
    if message is None:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            from trainer import config as config_lib

            error = config_lib.config_file_error(e)  # A bad argument of the file, configs/omniglot.py:ways=x.
            message = str(e) if error is None else f"invalid config {_config_argument(argv)}: {error}"
        except Exception as e:  # Raised while loading the config file: missing, syntax error, bad code.
            message = _unknown_option(argv, e) or (
                f"cannot load the config file (--config): {type(e).__name__}: {e}"
            )
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run():
    workdir.StartupSignals.install()  # First: a signal during imports or compilation is never lost.
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
