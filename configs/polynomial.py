"""Few-shot polynomial regression with a task family imported by path (examples/polynomial.py): cubics with
N(0, 1) coefficients on [-1, 1], targets with N(0, 0.1^2) noise, K = 5 support and 10 query points; an MLP with
two hidden layers of 40 swish units, lambda = 1, L-BFGS to tol 1e-6; 16 tasks per meta-step; 300 meta-steps.

Run:  python -m trainer.main --config=configs/polynomial.py --workdir=runs/polynomial
      (from the repository root, where `examples` is importable; elsewhere add the root to PYTHONPATH).
      The family's own fields: tasks.options.{degree, coefficient_std, x_min, x_max, noise_std}.
Result: RESULTS.md ("The plug-in family example"); the noise floor of the query MSE is 0.01.
"""

from trainer.config import family_config


def get_config():
    # The family's defaults are in c.tasks.options, so the command line can override them.
    c = family_config("examples.polynomial:Polynomial")
    c.model.hidden_sizes = (40, 40)
    c.tasks.options.noise_std = 0.1
    c.tasks.num_support = 5
    c.tasks.num_query = 10
    c.inner.l2reg = 1.0
    c.inner.maxiter = 100
    c.inner.tol = 1e-6
    c.meta_grad.solver_tol = 1e-8
    c.outer.learning_rate = 3e-3
    c.train.num_steps = 300
    c.train.meta_batch_size = 16
    c.eval.every_steps = 100
    c.eval.num_tasks = 200
    c.logging.every_steps = 50
    c.checkpoint.every_steps = 100
    return c
