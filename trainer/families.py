"""Task families behind one interface, chosen by `config.tasks.family`: `get_family(config)`.

`tasks.family` is a built-in name (FAMILIES: "sinusoid", "omniglot") or an import path "module.path:ClassName"
of a class outside this package (`family_class`, checked by `config.validate`). A family is a class built as
`Family(config)` that provides
  make_model(config)                       the model (the MLP for sinusoid, the conv net for omniglot)
  loss(model, params, x, y)                the per-task loss: MSE, or softmax cross-entropy of integer labels
  task_metrics(model, params, x, y)        extra per-task training metrics (accuracy for classification)
  eval_metrics(model, params, x, y)        the held-out metrics of one method: {"mse"} or {"loss", "acc"}
  baseline(task)                           the same metrics of the trivial predictor: predicting 0 (MSE is the
                                           mean of y^2), or chance (accuracy 1/N, cross-entropy log N)
  load_data(config)                        host-side arrays: TaskData(train=..., test=...), None for sinusoid
  sample(data, key, step, indices, dtype)  the training tasks of a step; pure and jittable
  heldout(data, key, indices, dtype)       held-out tasks i = fold_in(key, i), from the test data
and the class attributes
  baseline_name                            the trivial method's name in the evaluation ("zero", "chance")
  metric_names                             the held-out metrics, the reported one first
  loss_metric                              the one of them that is the loss
  keeps_eval_outputs                       whether evaluation keeps adapted parameters and tasks (figures)
An imported family may also declare `default_options`, its own config fields (tasks.options.<name>) with
their defaults; any family may declare `check_config(config)`, raising ValueError naming a bad field, which
`config.validate` runs (omniglot's: what the data set allows). `Regression` is the
regression part (MLP, MSE, the "zero" baseline): a family deriving from it writes `sample_task` only.
`data` (the image array) is an argument of the jitted sampling functions, placed once on every device, and
never a compile-time constant.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainer import config as config_lib
from trainer import model as model_lib
from trainer import omniglot as omniglot_lib
from trainer import sinusoid as sinusoid_lib

# A batch of tasks: support_x, support_y, query_x, query_y (and a family's extra arrays) with a leading task
# axis. Task i of step s is drawn from fold_in(fold_in(train_key, s), i) (fold_in(train_key, i) for a fixed
# pool), so which tasks a step sees does not depend on how the batch is split across devices or processes.
TaskBatch = dict[str, jax.Array]


def task_keys(
    base_key: jax.Array, step: jax.Array | int, task_indices: jax.Array, num_fixed_tasks: int = 0
) -> jax.Array:
    """Keys of the given tasks of a step: fold_in(fold_in(key, step), i), or fold_in(key, i) for a fixed pool."""
    if num_fixed_tasks:
        step_key = base_key
        task_indices = task_indices % num_fixed_tasks
    else:
        step_key = jax.random.fold_in(base_key, step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, task_indices)


def split_keys(seed: int) -> dict[str, jax.Array]:
    """Disjoint keys for model init, training tasks and held-out tasks (raw uint32 key data)."""
    base = jax.random.PRNGKey(seed)
    return dict(
        init=jax.random.fold_in(base, 0), train=jax.random.fold_in(base, 1), eval=jax.random.fold_in(base, 2)
    )


def support(batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
    return batch["support_x"], batch["support_y"]


def query(batch: TaskBatch) -> tuple[jax.Array, jax.Array]:
    return batch["query_x"], batch["query_y"]


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Host arrays the samplers read: `train` for training tasks, `test` for held-out ones (None: nothing)."""

    train: Any = None
    test: Any = None


def _heldout_keys(eval_key: jax.Array, task_indices: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(eval_key, task_indices)


@dataclasses.dataclass(frozen=True)
class Regression:
    """Few-shot regression with the MLP, the query MSE and predicting 0 as the baseline; `sample_task` is the family.

    Training task i of a step is sample_task(task_keys(train_key, step, i)), a fixed pool with
    tasks.num_fixed_train_tasks; held-out task i is sample_task(fold_in(eval_key, i)).
    """

    config: ml_collections.ConfigDict
    name: ClassVar[str] = "regression"
    baseline_name: ClassVar[str] = "zero"  # The trivial method's name in the evaluation.
    metric_names: ClassVar[tuple[str, ...]] = ("mse",)  # Held-out metrics; the first is the one reported.
    loss_metric: ClassVar[str] = "mse"  # The held-out metric that is the loss.
    keeps_eval_outputs: ClassVar[bool] = True  # Evaluation keeps adapted params and tasks (figures).

    def sample_task(self, key: jax.Array, dtype) -> TaskBatch:
        """One task: support_x [K, D], support_y [K, 1], query_x [Q, D], query_y [Q, 1], and any per-task
        arrays (the curve's parameters, say), kept with the evaluation's outputs."""
        raise NotImplementedError(f"{type(self).__name__} must define sample_task(key, dtype)")

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
        keys = task_keys(key, step, task_indices, self.config.tasks.num_fixed_train_tasks)
        return jax.vmap(lambda k: self.sample_task(k, dtype))(keys)

    def heldout(self, data, key, task_indices, dtype):
        return jax.vmap(lambda k: self.sample_task(k, dtype))(_heldout_keys(key, task_indices))


@dataclasses.dataclass(frozen=True)
class Sinusoid(Regression):
    """Few-shot regression of y = amplitude * sin(frequency * x + phase) (trainer/sinusoid.py)."""

    name: ClassVar[str] = "sinusoid"

    def sample_task(self, key: jax.Array, dtype) -> TaskBatch:
        return sinusoid_lib.sample_task(key, self.config.tasks, dtype)


@dataclasses.dataclass(frozen=True)
class Omniglot:
    """N-way K-shot character classification (trainer/omniglot.py); data are uint8 images [C, 20, S, S]."""

    config: ml_collections.ConfigDict
    name: ClassVar[str] = "omniglot"
    baseline_name: ClassVar[str] = "chance"
    metric_names: ClassVar[tuple[str, ...]] = ("acc", "loss")
    loss_metric: ClassVar[str] = "loss"
    keeps_eval_outputs: ClassVar[bool] = False  # 600 tasks of conv-net parameters are not worth keeping.

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        """What the data set allows (images per character, characters per split): trainer/omniglot.py."""
        omniglot_lib.check_config(config)

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
        keys = task_keys(key, step, task_indices, self.config.tasks.num_fixed_train_tasks)
        return self._sample(data, keys, dtype)

    def heldout(self, data, key, task_indices, dtype):
        return self._sample(data, _heldout_keys(key, task_indices), dtype)


FAMILIES = {"sinusoid": Sinusoid, "omniglot": Omniglot}

# What the trainer calls on a family and reads from it (the module docstring); `family_class` checks them.
INTERFACE_METHODS = (
    "make_model",
    "loss",
    "task_metrics",
    "eval_metrics",
    "baseline",
    "load_data",
    "sample",
    "heldout",
)
INTERFACE_ATTRIBUTES = ("baseline_name", "metric_names", "loss_metric", "keeps_eval_outputs")


def _import(module_name: str, field: str):
    """The module, or a ConfigError naming it and why it cannot be imported."""
    from jax._src import xla_bridge

    started = xla_bridge.backends_are_initialized()
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # Not found, a syntax error, or an error raised by the module's own code.
        missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        itself = missing is not None and (module_name + ".").startswith(missing + ".")  # Not a dependency.
        hint = " (run from the folder that holds it, or add that folder to PYTHONPATH)" if itself else ""
        raise config_lib.ConfigError(
            f"{field}: cannot import module {module_name!r}: {type(e).__name__}: {e}{hint}"
        ) from e
    if not started and xla_bridge.backends_are_initialized():
        # Device settings (--cpu_devices, jax.distributed) must come before JAX starts its backends.
        raise config_lib.ConfigError(
            f"{field}: importing module {module_name!r} started JAX's backends (it creates JAX arrays at "
            "import); create them inside the family's methods instead"
        )
    return module


def family_class(name: str) -> type:
    """The family class of `tasks.family`: a built-in one (FAMILIES) or the class at an import path
    "module.path:ClassName", imported now. Raises ConfigError when the module cannot be imported, has no
    such attribute, or the attribute is not a class with the family interface (each missing part named)."""
    if name in FAMILIES:
        return FAMILIES[name]
    field = f"config field 'tasks.family' = {name!r}"
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise config_lib.ConfigError(
            f"{field}: expected one of {sorted(FAMILIES)} or an import path 'module.path:ClassName'"
        )
    module = _import(module_name, field)
    try:
        family = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        classes = sorted(
            n
            for n, v in vars(module).items()
            if isinstance(v, type) and v.__module__ == module.__name__ and not n.startswith("_")
        )
        raise config_lib.ConfigError(
            f"{field}: module {module_name!r} has no attribute {attribute!r} (its classes: {classes})"
        ) from None
    if not isinstance(family, type):
        raise config_lib.ConfigError(
            f"{field}: {attribute!r} is a {type(family).__name__}, not a class (a family is a class, "
            "built as Family(config))"
        )
    methods = [m for m in INTERFACE_METHODS if not callable(getattr(family, m, None))]
    attributes = [a for a in INTERFACE_ATTRIBUTES if not hasattr(family, a)]
    if methods or attributes:
        parts = []
        if methods:
            parts.append(f"method(s) {methods}")
        if attributes:
            parts.append(f"class attribute(s) {attributes}")
        raise config_lib.ConfigError(
            f"{field}: {attribute} does not provide the task family interface (trainer/families.py): missing "
            + " and ".join(parts)
        )
    if family.loss_metric not in family.metric_names:
        raise config_lib.ConfigError(
            f"{field}: {attribute}.loss_metric = {family.loss_metric!r} is not one of its metric_names "
            f"{tuple(family.metric_names)}"
        )
    return family


def get_family(config: ml_collections.ConfigDict):
    """The family object of `config.tasks.family`."""
    return family_class(config.tasks.family)(config)
