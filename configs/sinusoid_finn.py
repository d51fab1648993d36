"""Finn et al. 2017 (MAML, section 5.1) sinusoid distribution, solved with iMAML.

Amplitude in [0.1, 5], phase shift in [0, pi], frequency 1, x in [-5, 5], K = 10 support points and 10 query
points, an MLP with two hidden layers of 40 ReLU units.

Run:  python -m trainer.main --config=configs/sinusoid_finn.py --workdir=runs/sinusoid_finn
"""

from trainer.config import default_config


def get_config():
    c = default_config()
    c.model.hidden_sizes = (40, 40)
    c.model.activation = "relu"
    c.tasks.amplitude_min, c.tasks.amplitude_max = 0.1, 5.0
    c.tasks.frequency_min, c.tasks.frequency_max = 1.0, 1.0
    c.tasks.phase_min, c.tasks.phase_max = 0.0, 3.141592653589793
    c.tasks.num_support = 10
    c.tasks.num_query = 10
    c.inner.l2reg = 1.0
    c.inner.maxiter = 200
    c.inner.tol = 1e-6
    c.train.num_steps = 2000
    c.train.meta_batch_size = 32
    c.eval.every_steps = 500
    c.eval.num_tasks = 200
    return c
