"""Tiny config for tests and smoke checks: a small MLP, few tasks, few inner iterations; seconds on a CPU.

Run:  python -m trainer.main --config=configs/smoke.py --workdir=/tmp/smoke
"""

from trainer.config import default_config


def get_config():
    c = default_config()
    c.model.hidden_sizes = (8, 8)
    c.inner.l2reg = 1.0
    c.inner.maxiter = 50
    c.inner.tol = 1e-6
    c.meta_grad.solver_maxiter = 50
    c.outer.learning_rate = 1e-2
    c.train.num_steps = 6
    c.train.meta_batch_size = 8
    c.eval.every_steps = 3
    c.eval.num_tasks = 8
    c.logging.every_steps = 2
    c.checkpoint.every_steps = 3
    return c
