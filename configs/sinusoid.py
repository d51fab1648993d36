"""Default: sinusoid few-shot regression (the notebook's task distribution), a fresh meta-batch of 32 tasks per step.

Run:  python -m trainer.main --config=configs/sinusoid.py --workdir=runs/sinusoid
(equivalently `make train`). Uses every local device (parallel.backend = shard_map).
"""

from trainer.config import default_config


def get_config():
    return default_config()
