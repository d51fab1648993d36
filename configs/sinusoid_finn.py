"""Finn et al. 2017 (MAML, section 5.1) sinusoid distribution, solved with iMAML.

Amplitude in [0.1, 5], phase shift in [0, pi], frequency 1, x in [-5, 5], K = 10 support points and 10 query
points, an MLP with two hidden layers of 40 units. Swish instead of Finn et al.'s ReLU: implicit
differentiation needs a twice-differentiable inner loss, and in a 40-step pilot (lambda 0.1) L-BFGS converged
on 3-9% of the tasks with swish against 0% with ReLU. lambda from the sweep in RESULTS.md; the inner solve is
capped at 100 L-BFGS iterations (tol 1e-5) to fit a CPU budget.

Run:  python -m trainer.main --config=configs/sinusoid_finn.py --workdir=runs/sinusoid_finn --cpu_devices=2
Result: see RESULTS.md (held-out K=10 MSE, steps and time).
"""

from trainer.config import default_config


def get_config():
    c = default_config()
    c.model.hidden_sizes = (40, 40)
    c.model.activation = "swish"
    c.tasks.amplitude_min, c.tasks.amplitude_max = 0.1, 5.0
    c.tasks.frequency_min, c.tasks.frequency_max = 1.0, 1.0
    c.tasks.phase_min, c.tasks.phase_max = 0.0, 3.141592653589793
    c.tasks.num_support = 10
    c.tasks.num_query = 10
    c.inner.l2reg = 10.0
    c.inner.maxiter = 100
    c.inner.tol = 1e-5
    c.meta_grad.solver_tol = 1e-8
    c.train.num_steps = 8000
    c.train.meta_batch_size = 32
    c.eval.every_steps = 1000
    c.eval.num_tasks = 1000
    c.checkpoint.every_steps = 250
    return c
