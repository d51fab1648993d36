"""Default: sinusoid few-shot regression on Finn et al. 2017's distribution, sized to show meta-learning in
about 2 minutes on a 2-core CPU.

Tasks y = amplitude * sin(x + phase), amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5], K = 10 support
and 10 query points (MAML, section 5.1); an MLP with two hidden layers of 40 swish units (implicit
differentiation needs a twice-differentiable inner loss); lambda = 10 (the sweep in RESULTS.md); L-BFGS to
tol 1e-5 (at most 100 iterations); 32 tasks per meta-step; 1000 meta-steps.

Run:  make train   (= python -m trainer.main --config=configs/sinusoid.py --workdir=runs/sinusoid)
Result: see README ("What `make train` shows") and RESULTS.md. configs/sinusoid_finn.py trains the same
experiment 8000 steps; configs/sinusoid_notebook.py is the reference notebook's task distribution.
"""

import math

from trainer.config import default_config


def get_config():
    c = default_config()
    c.model.hidden_sizes = (40, 40)
    c.model.activation = "swish"
    c.tasks.amplitude_min, c.tasks.amplitude_max = 0.1, 5.0
    c.tasks.frequency_min, c.tasks.frequency_max = 1.0, 1.0
    c.tasks.phase_min, c.tasks.phase_max = 0.0, math.pi
    c.tasks.num_support = 10
    c.tasks.num_query = 10
    c.inner.l2reg = 10.0
    c.inner.maxiter = 100
    c.inner.tol = 1e-5
    c.meta_grad.solver_tol = 1e-8
    c.train.num_steps = 1000
    c.train.meta_batch_size = 32
    c.eval.every_steps = 500
    c.eval.num_tasks = 500
    c.logging.every_steps = 100
    c.checkpoint.every_steps = 500
    return c
