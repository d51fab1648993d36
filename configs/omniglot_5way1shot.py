"""Omniglot 5-way 1-shot classification with iMAML (Rajeswaran et al. 2019), the paper's protocol.

5 characters per task, 1 support and 1 query images per character, 28x28, each class rotated by a random
multiple of 90 degrees; 1200 characters for meta-training, the other 423 for the 600 held-out test tasks.
Settings in trainer/config.py:omniglot_config (iMAML-GD's fixed inner gradient steps, 5 CG steps, meta-batch
32, Adam 1e-3, batch statistics, float32; lambda 0.5 and a damped implicit solve where the paper has lambda 2:
RESULTS.md); `--config.inner.solver=lbfgs` solves the inner problems with L-BFGS instead.

Run:  python -m trainer.main --config=configs/omniglot_5way1shot.py --workdir=runs/omniglot_5way1shot
(the archives are downloaded into ~/.cache/imaml_trainer/omniglot on first use; offline, add
--config.tasks.data_dir=/path/to/omniglot, a folder with images_background/images_evaluation as .npz,
unzipped folders or the .zip archives).
Paper (600 test tasks): iMAML-GD 99.16%, iMAML Hessian-free 99.50% mean accuracy; this run reports
eval/adapted_acc with its 95% CI (RESULTS.md has the measured numbers and their commands).
"""

from trainer.config import omniglot_config


def get_config():
    return omniglot_config(num_ways=5, num_shots=1)
