"""Omniglot N-way K-shot classification with iMAML (Rajeswaran et al. 2019, section 5 and appendix).

The argument after the file name chooses the row, `ways=N,shots=K` (each optional: 5 ways, 1 shot). Each of
the paper's four rows, with the paper's mean accuracy over 600 test tasks (iMAML-GD / iMAML Hessian-free):

  python -m trainer.main --config=configs/omniglot.py:ways=5,shots=1 --workdir=runs/omniglot_5way1shot
      99.16% / 99.50%
  python -m trainer.main --config=configs/omniglot.py:ways=5,shots=5 --workdir=runs/omniglot_5way5shot
      99.67% / 99.74%
  python -m trainer.main --config=configs/omniglot.py:ways=20,shots=1 --workdir=runs/omniglot_20way1shot
      94.46% / 96.18%
  python -m trainer.main --config=configs/omniglot.py:ways=20,shots=5 --workdir=runs/omniglot_20way5shot
      98.69% / 99.14%

The archives are downloaded into ~/.cache/imaml_trainer/omniglot on first use; offline, add
--config.tasks.data_dir=/path/to/omniglot, a folder with images_background/images_evaluation as .npz, unzipped
folders or the .zip archives. A run reports eval/adapted_acc with its 95% CI (RESULTS.md has the measured
numbers and their commands).

N characters per task, K support and K query images per character, 28x28, each class rotated by a random
multiple of 90 degrees; 1200 characters for meta-training, the other 423 for the 600 held-out test tasks.
The paper's settings: iMAML-GD, 16 inner gradient steps (25 for 20-way), 5 CG steps for the meta-gradient,
meta-batch 32, Adam 1e-3, MAML's conv net (4 x 64 filters) with batch statistics of the current batch,
float32. Two choices differ from the paper's lambda = 2 and undamped solve, as measured in RESULTS.md
("Learning per meta-step"): lambda = 0.5, and the implicit solve damped by 5 (16 fixed steps on a ReLU conv
net need not reach a minimum, H + lambda I can then be indefinite, and 5 undamped CG steps returned
meta-gradients orders of magnitude too large). `--config.inner.solver=lbfgs` solves the inner problems with
L-BFGS instead.
"""

from trainer.config import ConfigError, default_config

USAGE = "configs/omniglot.py:ways=N,shots=K"
DEFAULTS = {"ways": 5, "shots": 1}
MINIMUM = {"ways": 2, "shots": 1}  # As validate's rules for tasks.num_ways and tasks.num_support.


def parse_argument(arg: str) -> dict[str, int]:
    """`ways=N,shots=K` (either or both, in any order) -> {"ways": N, "shots": K}, the rest defaults.

    Raises ConfigError naming the key and what it expects."""
    values = dict(DEFAULTS)
    given = set()
    for item in arg.split(",") if arg.strip() else ():
        key, equals, text = (part.strip() for part in item.partition("="))
        if key not in DEFAULTS or not equals:
            raise ConfigError(
                f"unknown config argument {item.strip()!r} in {arg!r}: expected keys {sorted(DEFAULTS)} as "
                f"{USAGE}"
            )
        if key in given:
            raise ConfigError(f"config argument {key!r} is given twice in {arg!r} ({USAGE})")
        given.add(key)
        if not (text.isascii() and text.isdigit() and int(text) >= MINIMUM[key]):
            raise ConfigError(
                f"config argument {key!r} = {text!r} is invalid: expected an integer >= {MINIMUM[key]} ({USAGE})"
            )
        values[key] = int(text)
    return values


def get_config(arg: str = "ways=5,shots=1"):
    """The paper's Omniglot `ways`-way `shots`-shot experiment."""
    values = parse_argument(arg)
    num_ways, num_shots = values["ways"], values["shots"]
    c = default_config()
    c.model.dtype = "float32"
    c.model.activation = "relu"
    c.model.conv_width = 64
    c.model.conv_blocks = 4
    c.model.conv_impl = "patches"  # The same maths as "xla"; faster on XLA:CPU (bench.omniglot).
    c.model.normalization = "batch"  # Statistics of the batch at hand (support or query set), as MAML's.
    c.tasks.family = "omniglot"
    c.tasks.num_ways = num_ways
    c.tasks.num_support = num_shots
    c.tasks.num_query = num_shots
    c.tasks.split = "random"
    c.tasks.num_train_classes = 1200
    c.tasks.num_test_classes = 0  # The other 423.
    c.tasks.image_size = 28
    c.tasks.rotate = True
    c.inner.solver = "gd"
    c.inner.gd_stepsize = 0.1
    c.inner.l2reg = 0.5
    c.inner.maxiter = 16 if num_ways <= 5 else 25
    c.inner.tol = 1e-4  # Reachable in float32; solves stop at maxiter, as the paper's fixed steps do.
    c.meta_grad.estimator = "implicit"
    c.meta_grad.linear_solver = "cg"
    c.meta_grad.solver_maxiter = 5  # The paper's 5 CG steps (tol below float32 roundoff: always 5 steps).
    c.meta_grad.solver_tol = 1e-10
    c.meta_grad.damping = 5.0
    # A fixed budget of 16 steps does not reach tol: only non-finite tasks are dropped.
    c.meta_grad.drop_tasks = "nonfinite"
    c.outer.optimizer = "adam"
    c.outer.learning_rate = 1e-3
    c.train.num_steps = 20000  # The paper's code asks for at least 20,000 meta-steps.
    c.train.meta_batch_size = 32
    c.eval.every_steps = 1000
    c.eval.num_tasks = 600  # Mean accuracy over 600 held-out tasks with a 95% CI, as reported in the paper.
    c.eval.batch_size = 100
    c.logging.every_steps = 50
    c.checkpoint.every_steps = 1000
    return c
