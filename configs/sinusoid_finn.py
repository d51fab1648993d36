"""Finn et al. 2017 (MAML, section 5.1) sinusoid distribution, solved with iMAML: the default config
(configs/sinusoid.py) trained 8000 steps and evaluated on 1000 held-out tasks.

Run:  python -m trainer.main --config=configs/sinusoid_finn.py --workdir=runs/sinusoid_finn
Result: RESULTS.md ("Sinusoid regression, Finn et al. 2017").
"""

from configs import sinusoid


def get_config():
    c = sinusoid.get_config()
    c.train.num_steps = 8000
    c.eval.num_tasks = 1000
    c.logging.every_steps = 10
    c.checkpoint.every_steps = 250
    return c
