"""Task families behind one interface, chosen by `config.tasks.family`: `get_family(config)`.

A family provides
  make_model(config)                       the model (the MLP for sinusoid, the conv net for omniglot)
  loss(model, params, x, y)                the per-task loss: MSE, or softmax cross-entropy of integer labels
  task_metrics(model, params, x, y)        extra per-task training metrics (accuracy for classification)
  eval_metrics(model, params, x, y)        the held-out metrics of one method: {"mse"} or {"loss", "acc"}
  baseline(task)                           the same metrics of the trivial predictor: predicting 0 (MSE is the
                                           mean of y^2), or chance (accuracy 1/N, cross-entropy log N)
  load_data(config)                        host-side arrays: TaskData(train=..., test=...), None for sinusoid
  sample(data, key, step, indices, dtype)  the training tasks of a step; pure and jittable
  heldout(data, key, indices, dtype)       held-out tasks i = fold_in(key, i), from the test data
`data` (the image array) is an argument of the jitted sampling functions, placed once on every device, and
never a compile-time constant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainer import model as model_lib
from trainer import omniglot as omniglot_lib
from trainer import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Host arrays the samplers read: `train` for training tasks, `test` for held-out ones (None: nothing)."""

    train: Any = None
    test: Any = None


def _heldout_keys(eval_key: jax.Array, task_indices: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(eval_key, task_indices)


@dataclasses.dataclass(frozen=True)
class Sinusoid:
    """Few-shot regression of y = amplitude * sin(frequency * x + phase) (trainer/tasks.py)."""

    config: ml_collections.ConfigDict
    name: ClassVar[str] = "sinusoid"
    baseline_name: ClassVar[str] = "zero"  # The trivial method's name in the evaluation.
    metric_names: ClassVar[tuple[str, ...]] = ("mse",)  # Held-out metrics; the first is the one reported.
    loss_metric: ClassVar[str] = "mse"  # The held-out metric that is the loss.
    keeps_eval_outputs: ClassVar[bool] = True  # Evaluation keeps adapted params and tasks (figures).

    def make_model(self, config: ml_collections.ConfigDict):
        return model_lib.make_model(config)

    def loss(self, model, params, x, y):
        return model_lib.mse_loss(model, params, x, y)

    def task_metrics(self, model, params, x, y) -> dict[str, jax.Array]:
        return {}

    def eval_metrics(self, model, params, x, y) -> dict[str, jax.Array]:
        return {"mse": model_lib.mse_loss(model, params, x, y)}

    def baseline(self, task) -> dict[str, jax.Array]:
        return {"mse": jnp.mean(task["query_y"] ** 2)}

    def load_data(self, config: ml_collections.ConfigDict) -> TaskData:
        return TaskData()

    def sample(self, data, key, step, task_indices, dtype):
        return tasks_lib.sample_tasks(self.config.tasks, key, step, task_indices, dtype)

    def heldout(self, data, key, task_indices, dtype):
        return jax.vmap(lambda k: tasks_lib.sample_sinusoid_task(k, self.config.tasks, dtype))(
            _heldout_keys(key, task_indices)
        )


@dataclasses.dataclass(frozen=True)
class Omniglot:
    """N-way K-shot character classification (trainer/omniglot.py); data are uint8 images [C, 20, S, S]."""

    config: ml_collections.ConfigDict
    name: ClassVar[str] = "omniglot"
    baseline_name: ClassVar[str] = "chance"
    metric_names: ClassVar[tuple[str, ...]] = ("acc", "loss")
    loss_metric: ClassVar[str] = "loss"
    keeps_eval_outputs: ClassVar[bool] = False  # 600 tasks of conv-net parameters are not worth keeping.

    def make_model(self, config: ml_collections.ConfigDict):
        return model_lib.make_model(config)

    def loss(self, model, params, x, y):
        return model_lib.cross_entropy_loss(model, params, x, y)

    def task_metrics(self, model, params, x, y) -> dict[str, jax.Array]:
        return {"accuracy": model_lib.accuracy(model, params, x, y)}

    def eval_metrics(self, model, params, x, y) -> dict[str, jax.Array]:
        return {
            "acc": model_lib.accuracy(model, params, x, y),
            "loss": model_lib.cross_entropy_loss(model, params, x, y),
        }

    def baseline(self, task) -> dict[str, jax.Array]:
        dtype = task["query_x"].dtype
        ways = self.config.tasks.num_ways
        return {"acc": jnp.asarray(1.0 / ways, dtype), "loss": jnp.asarray(math.log(ways), dtype)}

    def load_data(self, config: ml_collections.ConfigDict) -> TaskData:
        """The resized images of the meta-train and meta-test characters (loaded, cached, split on host)."""
        t = config.tasks
        images = omniglot_lib.load(t.data_dir, t.cache_dir, t.image_size)
        train_rows, test_rows = omniglot_lib.split_rows(
            t.split, t.split_seed, t.num_train_classes, t.num_test_classes
        )
        part = lambda rows: dict(images=images[rows], ids=(rows + 1).astype(np.int32))
        return TaskData(train=part(train_rows), test=part(test_rows))

    def _sample(self, data, keys, dtype):
        t = self.config.tasks
        one = functools.partial(
            omniglot_lib.sample_task,
            data["images"],
            data["ids"],
            num_ways=t.num_ways,
            num_support=t.num_support,
            num_query=t.num_query,
            rotate=t.rotate,
            dtype=dtype,
        )
        return jax.vmap(one)(keys)

    def sample(self, data, key, step, task_indices, dtype):
        keys = tasks_lib.task_keys(key, step, task_indices, self.config.tasks.num_fixed_train_tasks)
        return self._sample(data, keys, dtype)

    def heldout(self, data, key, task_indices, dtype):
        return self._sample(data, _heldout_keys(key, task_indices), dtype)


FAMILIES = {"sinusoid": Sinusoid, "omniglot": Omniglot}


def get_family(config: ml_collections.ConfigDict):
    """The family object of `config.tasks.family`."""
    name = config.tasks.family
    if name not in FAMILIES:
        raise ValueError(f"config field 'tasks.family' = {name!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name](config)
