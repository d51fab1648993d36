"""A sweep of one config field: `python -m trainer.sweep --config=FILE --workdir=DIR --field=inner.l2reg
--values=0.01,0.1,1,10 [--config.<group>.<field>=value ...] [--cpu_devices=N]`.

Trains one run per value in DIR/<field>_<value> (ordinary, resumable runs: rerunning the command resumes the
unfinished ones and re-reads the finished ones' final evaluation), then writes DIR/sweep_<field>.json, .md (the
table of every evaluation method, mean and 95% CI) and .png (metric against the value); see `studies.sweep`.
Every value is validated before the first run starts.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding one workdir per value.")
_FIELD = flags.DEFINE_string("field", "inner.l2reg", "The swept config field, GROUP.FIELD.")
_VALUES = flags.DEFINE_list("values", None, "Comma-separated values of the field.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "As trainer.main's --cpu_devices.")
flags.mark_flags_as_required(["config", "workdir", "values"])


def parse_values(config, field: str, texts: list[str]) -> list:
    """The values as the field's type (float, int, bool or str); a ConfigError names the bad one."""
    from trainer import config as config_lib
    from trainer import studies

    group, name = studies.split_field(config, field)
    kind = type(config[group][name])
    values = []
    for text in texts:
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                values.append(text.lower() == "true")
            else:
                values.append(kind(text))
        except ValueError:
            raise config_lib.ConfigError(
                f"--values: {text!r} is not a valid {kind.__name__} for field {field!r}"
            ) from None
    return values


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from trainer import config as config_lib
    from trainer import distributed

    config = _CONFIG.value
    try:
        distributed.use_cpu_devices(_CPU_DEVICES.value)  # Before anything could start JAX.
        config_lib.validate(config)
        values = parse_values(config, _FIELD.value, _VALUES.value)
    except (config_lib.ConfigError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trainer import checkpointing, studies, train

    try:
        record = studies.sweep(config, _WORKDIR.value, _FIELD.value, values)
    except (config_lib.ConfigError, checkpointing.CheckpointError, train.NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except checkpointing.Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return checkpointing.PREEMPTED_EXIT_STATUS
    table = studies.sweep_table(record)
    stem = os.path.join(_WORKDIR.value, f"sweep_{_FIELD.value.split('.', 1)[1]}")
    print(table)
    for path in studies.write_record(record, stem, table, studies.sweep_figure(record)):
        print(f"wrote {path}")
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a bad argument of the config file (`--config=configs/omniglot.py:ways=x`) is one
    line on stderr and exit status 2, as trainer.main reports it (other flag errors: absl's report)."""
    from trainer import config as config_lib

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        error = config_lib.config_file_error(e)
        if error is None:
            return app.parse_flags_with_usage(argv)
    config = next((a[len("--config=") :] for a in argv[1:] if a.startswith("--config=")), "--config")
    print(f"error: invalid config {config}: {error}", file=sys.stderr)
    sys.exit(2)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
