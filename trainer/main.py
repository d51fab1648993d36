"""Command-line entry point: `python -m trainer.main --config=configs/sinusoid.py --workdir=DIR`.

Kept short on purpose: it parses flags, validates the config and calls `train.train_and_evaluate`.
Config fields are overridden with `--config.<group>.<field>=value`.
"""

from __future__ import annotations

import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even if fields that change the maths differ from the saved config.")
_RESTORE_STEP = flags.DEFINE_integer("restore_step", None, "Resume from this checkpoint step instead of the latest.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
    from trainer import config as config_lib

    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        print(f"error: invalid config {flags.FLAGS['config'].config_filename}: {e}", file=sys.stderr)
        return 2
    from trainer import checkpointing, train

    try:
        train.train_and_evaluate(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                                 restore_step=_RESTORE_STEP.value)
    except (config_lib.ConfigError, checkpointing.CheckpointError, train.NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
