"""Task families: the sinusoid family is the old code path; the omniglot family's conv net, losses, implicit
meta-gradient (against a dense Hessian solve and finite differences), evaluation and a short training run; a
family imported by path (examples/polynomial.py) trains and evaluates end to end, and a family that cannot be
imported or lacks part of the interface is one ConfigError naming what is wrong."""

from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from configs import omniglot as omniglot_configs
from examples.polynomial import Polynomial
from tests import helpers
from trainer import checkpointing, evaluate, evaluation, executables, families, train
from trainer import config as config_lib
from trainer import meta_grad as meta_grad_lib
from trainer import model as model_lib

SHARED = os.path.normpath(os.path.join(helpers.REPO, "..", "shared", "data", "omniglot"))
REAL_CACHE = os.environ.get(
    "IMAML_TEST_OMNIGLOT_CACHE", os.path.join(tempfile.gettempdir(), "imaml-test-omniglot-cache")
)


def _omniglot_config(**overrides):
    """A tiny omniglot config: 3-way 2-shot, 8x8 images, a 2-block conv net of 4 filters, float64."""
    c = omniglot_configs.get_config("ways=3,shots=2")
    c.model.dtype = "float64"
    c.model.conv_width = 4
    c.model.conv_blocks = 2
    c.tasks.image_size = 8
    c.parallel.backend = "none"
    c.parallel.task_mapping = "map"  # lax.map: half the compile time of a vmapped conv-net solve on CPU.
    # The family's tests use L-BFGS, per-image statistics and the exact implicit gradient (the configs' iMAML-GD
    # with batch statistics and a damped solve is trained in RESULTS.md).
    c.inner.solver, c.model.normalization, c.meta_grad.damping = "lbfgs", "layer", 0.0
    return config_lib.with_fields(c, overrides)


def _synthetic_data(num_classes=12, size=8, seed=0):
    """Host data of the omniglot family: uint8 images [C, 20, S, S] (class prototypes plus noise) and ids."""
    rng = np.random.RandomState(seed)
    prototypes = rng.rand(num_classes, 1, size, size) < 0.3
    noise = rng.rand(num_classes, 20, size, size) < 0.1
    images = (np.logical_xor(prototypes, noise) * 255).astype(np.uint8)
    return dict(images=images, ids=np.arange(1, num_classes + 1, dtype=np.int32))


def test_get_family_dispatches_on_the_config():
    assert families.get_family(helpers.small_config()).name == "sinusoid"
    assert families.get_family(_omniglot_config()).name == "omniglot"
    config = helpers.small_config()
    config.tasks.family = "mnist"
    with pytest.raises(ValueError, match="tasks.family"):
        families.get_family(config)


def test_sinusoid_family_is_the_task_module_unchanged():
    config = helpers.small_config()
    family = families.get_family(config)
    key = jax.random.PRNGKey(3)
    assert family.load_data(config) == families.TaskData(None, None)
    ours = family.sample(None, key, 5, jnp.arange(6), jnp.float64)
    reference = helpers.sinusoid_tasks(config.tasks, key, 5, jnp.arange(6), jnp.float64)
    held = family.heldout(None, key, jnp.arange(6), jnp.float64)
    held_reference = helpers.sinusoid_heldout(config.tasks, key, 6, jnp.float64)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name])
        np.testing.assert_array_equal(held[name], held_reference[name])
    first = jax.tree.map(lambda a: a[0], ours)
    np.testing.assert_allclose(family.baseline(first)["mse"], np.mean(np.asarray(ours["query_y"][0]) ** 2))


def test_classification_losses_match_numpy():
    config = _omniglot_config()
    family = families.get_family(config)
    model = family.make_model(config)
    params = model_lib.init_params(model, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (7, 8, 8, 1), jnp.float64)
    y = jnp.asarray([0, 1, 2, 0, 1, 2, 2])
    logits = np.asarray(model.apply(params, x))
    assert logits.shape == (7, 3)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        family.loss(model, params, x, y), -np.mean(log_softmax[np.arange(7), y]), rtol=1e-12
    )
    np.testing.assert_allclose(
        family.task_metrics(model, params, x, y)["accuracy"], np.mean(logits.argmax(-1) == np.asarray(y))
    )
    baseline = family.baseline(dict(query_x=x))
    np.testing.assert_allclose(baseline["acc"], 1 / 3)
    np.testing.assert_allclose(baseline["loss"], math.log(3))


def test_conv_net_is_mamls_and_layer_norm_is_per_image():
    config = omniglot_configs.get_config("ways=5,shots=1")
    model = model_lib.make_model(config)
    shapes = jax.eval_shape(lambda k: model_lib.init_params(model, k), jax.random.PRNGKey(0))
    # 3x3 convs 1->64, 3 x 64->64 (kernels and biases), 4 norms (scale, bias), head 64->5.
    expected = (9 * 64 + 64) + 3 * (9 * 64 * 64 + 64) + 4 * 2 * 64 + (64 * 5 + 5)
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == expected == 112261
    assert model.apply(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), jnp.zeros((2, 28, 28, 1))
    ).shape == (2, 5)

    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 1), jnp.float64)
    for normalization, independent in (("layer", True), ("none", True), ("batch", False)):
        small = model_lib.make_model(_omniglot_config(**{"model.normalization": normalization}))
        params = model_lib.init_params(small, jax.random.PRNGKey(2))
        together, alone = small.apply(params, x)[:2], small.apply(params, x[:2])
        assert np.allclose(together, alone, atol=1e-12) == independent, normalization


# Swish, not ReLU: tight inner convergence needs a smooth loss (L-BFGS stalls on ReLU kinks at residual ~0.1).
TIGHT = {
    "inner.tol": 1e-10,
    "inner.maxiter": 1000,
    "meta_grad.solver_tol": 1e-12,
    "meta_grad.solver_maxiter": 1000,
    "inner.l2reg": 0.5,
    "model.activation": "swish",
}


def test_conv_net_implicit_meta_gradient_matches_finite_differences():
    """lambda (H + lambda I)^{-1} grad L_query(x*) of a 219-parameter conv net (float64, tight solves) against
    central differences of the meta-loss L_query(x*(theta)) along random directions."""
    config = _omniglot_config(**TIGHT)
    family = families.get_family(config)
    model = family.make_model(config)
    theta = model_lib.init_params(model, jax.random.PRNGKey(0))
    task = jax.tree.map(
        lambda a: a[0], family.sample(_synthetic_data(), jax.random.PRNGKey(1), 0, jnp.arange(1), jnp.float64)
    )
    task_meta_grad = jax.jit(meta_grad_lib.make_task_meta_grad(config, model, family))
    grad, metrics = task_meta_grad(theta, task)
    assert float(metrics["inner_converged"]) == 1.0, metrics
    assert 0 < float(metrics["support_loss"]) < float(metrics["query_loss"])

    def meta_loss(theta_flat):  # The same compiled program: its query loss is the meta-loss.
        _, metrics = task_meta_grad(unravel(theta_flat), task)
        assert float(metrics["inner_converged"]) == 1.0, metrics
        return float(metrics["query_loss"])

    theta_flat, unravel = ravel_pytree(theta)
    grad_flat = ravel_pytree(grad)[0]
    eps = 1e-5
    for i, direction in enumerate(jax.random.normal(jax.random.PRNGKey(2), (3, theta_flat.size))):
        direction = direction / jnp.linalg.norm(direction)
        fd = (meta_loss(theta_flat + eps * direction) - meta_loss(theta_flat - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(
            float(jnp.vdot(grad_flat, direction)), fd, rtol=1e-4, atol=1e-8, err_msg=f"direction {i}"
        )


def test_classification_evaluation_reports_accuracy_with_ci_and_chunks_exactly():
    """7 tasks in chunks of 3 (the last one padded with tasks that are dropped) against 4 tasks in chunks of
    3: a task's result does not depend on its chunk (one compiled program: chunks have one shape)."""
    config = _omniglot_config(
        **{"eval.num_tasks": 7, "eval.batch_size": 3, "inner.maxiter": 20, "inner.tol": 1e-6}
    )
    family = families.get_family(config)
    model = family.make_model(config)
    theta = model_lib.init_params(model, jax.random.PRNGKey(0))
    data = _synthetic_data()
    summary, outputs = evaluation.Evaluator(config, model, jax.random.PRNGKey(4), family, "map", data=data)(
        theta
    )
    config.eval.num_tasks = 4
    few_summary, few = evaluation.Evaluator(config, model, jax.random.PRNGKey(4), family, "map", data=data)(
        theta
    )
    assert set(evaluation.methods(family)) == {"adapted", "prior", "chance", "scratch_prox", "scratch"}
    for method in evaluation.methods(family):
        for metric in ("acc", "loss"):
            per_task = outputs["per_task"][f"{method}_{metric}"]
            assert per_task.shape == (7,)
            np.testing.assert_allclose(per_task[:4], few["per_task"][f"{method}_{metric}"], rtol=1e-10)
            np.testing.assert_allclose(summary[f"eval/{method}_{metric}"], per_task.mean(), rtol=1e-12)
            np.testing.assert_allclose(
                summary[f"eval/{method}_{metric}_ci95"],
                1.96 * per_task.std(ddof=1) / math.sqrt(7),
                rtol=1e-10,
            )
    assert summary["eval/chance_acc"] == pytest.approx(1 / 3) and summary["eval/chance_acc_ci95"] == 0
    assert summary["eval/num_tasks"] == 7 and few_summary["eval/num_tasks"] == 4
    assert 0 < summary["eval/adapted_acc"] < 1 and summary["eval/adapted_acc_ci95"] > 0
    assert "adapted" not in outputs  # Conv-net parameters of every task are not kept.
    line = evaluation.format_summary(3, summary)
    assert line.startswith("[eval step 3] held-out query accuracy over 7 tasks: adapted ")
    assert "chance 0.3333" in line


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED, "images_background.npz")),
    reason=f"the shared Omniglot data are not at {SHARED}",
)
@pytest.mark.slow  # Two conv-net programs to compile (train step, evaluation): minutes on a busy 2-core CPU.
def test_short_training_run_on_real_characters_beats_chance(tmp_path):
    """5-way 1-shot on 300 meta-training characters, 14x14 images, a small conv net: held-out accuracy rises
    clearly above chance (20%) and above the un-meta-trained initialisation."""
    config = omniglot_configs.get_config("ways=5,shots=1")
    config.tasks.data_dir, config.tasks.cache_dir = SHARED, REAL_CACHE
    config.tasks.num_train_classes, config.tasks.num_test_classes = 300, 100
    config.tasks.image_size = 14
    config.model.conv_width, config.model.conv_blocks = 16, 3
    config.train.num_steps, config.train.meta_batch_size = 40, 8
    config.outer.learning_rate = 3e-3
    config.inner.maxiter = 8
    config.eval.num_tasks, config.eval.every_steps, config.eval.batch_size = 100, 0, 0
    config.logging.every_steps, config.checkpoint.every_steps = 20, 0
    config.parallel.backend, config.parallel.task_mapping = "none", "map"
    config_lib.validate(config)
    model = model_lib.make_model(config)
    family = families.get_family(config)
    data = family.load_data(config)
    keys = families.split_keys(config.seed)
    before, _ = evaluation.Evaluator(
        config, model, keys["eval"], families.get_family(config), "map", data=data.test
    )(model_lib.init_params(model, keys["init"]))
    result = train.train_and_evaluate(config, str(tmp_path))
    after = result.eval_summary
    assert "query_accuracy" in result.history[-1] and "support_accuracy" in result.history[-1]
    assert after["eval/adapted_acc"] - after["eval/adapted_acc_ci95"] > 0.2 + 0.1, after
    assert after["eval/adapted_acc"] > before["eval/adapted_acc"] + 0.05, (before, after)


# A family imported by path: tasks.family = "module.path:ClassName", its fields in tasks.options.
POLYNOMIAL = "examples.polynomial:Polynomial"


# Fixed-step gradient descent compiles in a fraction of L-BFGS's time; its residuals stay above tol.
FAST_SOLVER = {"inner.solver": "gd", "inner.maxiter": 10, "meta_grad.drop_tasks": "nonfinite"}


def _polynomial_config(**overrides):
    return helpers.small_config(**{"tasks.family": POLYNOMIAL, **overrides})


def test_polynomial_tasks_are_their_polynomials_keyed_by_step_and_index():
    family = families.get_family(_polynomial_config(**{"tasks.options.degree": 2}))
    noisy = families.get_family(_polynomial_config(**{"tasks.options.noise_std": 0.5}))
    assert isinstance(family, Polynomial) and family.name == "polynomial"
    key = jax.random.PRNGKey(3)

    @jax.jit  # One program for the three draws (compiling random sampling takes seconds).
    def draw(key):
        # Task 2 of step 5 alone, from its own key (families.task_keys), then within a batch.
        alone = family.sample_task(families.task_keys(key, 5, jnp.arange(4))[2], jnp.float64)
        tasks = family.sample(None, key, 5, jnp.arange(4), jnp.float64)
        return alone, tasks, noisy.heldout(None, key, jnp.arange(200), jnp.float64)

    alone, tasks, held = jax.tree.map(np.asarray, draw(key))
    assert tasks["support_x"].shape == (4, 6, 1) and tasks["coefficients"].shape == (4, 3)
    for i in range(4):
        for part in ("support", "query"):
            x = tasks[f"{part}_x"][i, :, 0]
            assert np.all((x >= -1) & (x <= 1))
            np.testing.assert_allclose(
                tasks[f"{part}_y"][i, :, 0], np.polyval(tasks["coefficients"][i], x), rtol=1e-12
            )
    np.testing.assert_allclose(alone["query_y"], tasks["query_y"][2], rtol=1e-12)
    exact = np.stack([np.polyval(held["coefficients"][i], held["query_x"][i, :, 0]) for i in range(200)])
    assert np.std(held["query_y"][..., 0] - exact) == pytest.approx(0.5, rel=0.05)


def test_imported_family_trains_and_evaluates_with_every_baseline(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    built = []  # Training and evaluation build the family's own model.
    make_model = Polynomial.make_model
    monkeypatch.setattr(
        Polynomial, "make_model", lambda self, config: built.append(1) or make_model(self, config)
    )
    result = train.train_and_evaluate(_polynomial_config(**FAST_SOLVER), workdir)
    assert len(built) == 1
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["query_loss"]) for h in result.history)
    saved = checkpointing.read_config(workdir)  # The resolved options: the family's defaults.
    assert saved["tasks"]["family"] == POLYNOMIAL and saved["tasks"]["options"] == Polynomial.default_options

    record = evaluate.evaluate_workdir(workdir)  # From the checkpoint's config: the family imported again.
    assert len(built) == 2
    assert record["step"] == 4 and record["family"] == POLYNOMIAL and record["metric_names"] == ["mse"]
    assert list(record["methods"]) == ["adapted", "prior", "zero", "scratch_prox", "scratch"]
    for method, values in record["methods"].items():
        assert np.isfinite(values["mse"]["mean"]) and values["mse"]["ci95"] > 0, method
        assert values["mse"]["mean"] == pytest.approx(result.eval_summary[f"eval/{method}_mse"], rel=1e-9)
    # The prediction figure draws sinusoids; another family gets the training curves only.
    assert [os.path.basename(path) for path in record["figures"]] == ["step_4_training.png"]


def _module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


_INCOMPLETE = """
    class Incomplete:
        baseline_name = "zero"
        loss_metric = "mse"

        def __init__(self, config):
            self.config = config

        def make_model(self, config): ...
        def loss(self, model, params, x, y): ...
        def task_metrics(self, model, params, x, y): ...
        def eval_metrics(self, model, params, x, y): ...
        def baseline(self, task): ...
        def load_data(self, config): ...
"""


@pytest.mark.parametrize(
    "family,expected",
    [
        (
            "no_such_family_module:Family",
            r"cannot import module 'no_such_family_module': ModuleNotFoundError: No module named "
            r"'no_such_family_module' \(run from the folder that holds it, or add that folder to PYTHONPATH\)",
        ),
        (
            "family_needs_a_dependency:Family",
            r"cannot import module 'family_needs_a_dependency': ModuleNotFoundError: No module named "
            r"'not_installed_dependency'$",
        ),
        ("family_raises:Family", r"cannot import module 'family_raises': RuntimeError: boom at import"),
        (
            "examples.polynomial:Polynomal",
            r"module 'examples.polynomial' has no attribute 'Polynomal' \(its classes: \['Polynomial'\]\)",
        ),
        ("examples.polynomial:families", r"'families' is a module, not a class"),
        (
            "family_incomplete:Incomplete",
            r"Incomplete does not provide the task family interface \(trainer/families.py\): missing "
            r"method\(s\) \['sample', 'heldout'\] and class attribute\(s\) \['metric_names', 'keeps_eval_outputs'\]",
        ),
        (
            "examples.polynomial",
            r"expected one of \['sinusoid', 'omniglot'\] or an import path 'module.path:ClassName'",
        ),
    ],
)
def test_a_family_that_cannot_be_used_is_one_config_error_naming_why(tmp_path, monkeypatch, family, expected):
    _module(tmp_path, monkeypatch, "family_needs_a_dependency", "import not_installed_dependency\n")
    _module(tmp_path, monkeypatch, "family_raises", "raise RuntimeError('boom at import')\n")
    _module(tmp_path, monkeypatch, "family_incomplete", _INCOMPLETE)
    with pytest.raises(config_lib.ConfigError, match=expected) as error:
        config_lib.with_fields(helpers.small_config(), {"tasks.family": family})
    assert "\n" not in str(error.value) and f"'tasks.family' = {family!r}" in str(error.value)


@pytest.mark.parametrize(
    "fields,expected",
    [
        (
            {"tasks.options.degre": 2},
            r"unknown config field\(s\) \['tasks.options.degre'\] of tasks.family = "
            r"'examples.polynomial:Polynomial'; its fields: \['tasks.options.coefficient_std', 'tasks.options.degree'",
        ),
        ({"tasks.options.degree": 2.5}, r"'tasks.options.degree' = 2.5 is invalid: expected an integer"),
        (
            {"tasks.options.noise_std": "none"},
            r"'tasks.options.noise_std' = 'none' is invalid: expected a finite",
        ),
        # The family's own check_config.
        ({"tasks.options.x_min": 2.0}, r"'tasks.options.x_min' = 2.0 must be < 'x_max' = 1.0"),
        ({"tasks.options.degree": -1}, r"'tasks.options.degree' = -1: expected >= 0"),
        (
            {"tasks.family": "sinusoid", "tasks.options.degree": 3},
            r"'tasks.options' .* is for imported task families",
        ),
    ],
)
def test_family_fields_are_checked_by_name(fields, expected):
    with pytest.raises(config_lib.ConfigError, match=expected):
        _polynomial_config(**fields)


def test_family_fields_are_maths_fields_and_key_the_compiled_step():
    config = _polynomial_config()
    names = set(config_lib.maths_fields(config))
    assert {"tasks.family", "tasks.options.degree", "tasks.options.noise_std"} <= names
    assert "tasks.options" in config_lib.maths_fields()  # All of them at once, for callers without a config.
    assert config_lib.known_field("tasks.options.degree")
    assert not config_lib.known_field("tasks.optionz.degree")
    # A compiled train step is never loaded for a config with other options.
    quadratic = config_lib.with_fields(config, {"tasks.options.degree": 2})
    assert executables.program_fields(config) != executables.program_fields(quadratic)
    assert config_lib.family_config(POLYNOMIAL).tasks.options.to_dict() == Polynomial.default_options


def test_cli_trains_the_example_config_and_refuses_an_unusable_family(tmp_path):
    done = helpers.run_cli(
        [
            "--config=configs/polynomial.py",
            f"--workdir={tmp_path / 'run'}",
            "--cpu_devices=0",
            "--config.parallel.backend=none",
            "--config.train.num_steps=2",
            "--config.train.meta_batch_size=4",
            *(f"--config.{name}={value}" for name, value in FAST_SOLVER.items()),
            "--config.eval.num_tasks=4",
            "--config.eval.every_steps=0",
            "--config.tasks.options.degree=2",  # A family field, overridden like any other.
        ]
    )
    assert done.returncode == 0, done.stderr
    assert "adapted" in done.stdout and "zero" in done.stdout
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["tasks"]["options"]["degree"] == 2
    # Resuming with another value of a family field changes the maths: refused, naming it.
    again = helpers.run_cli(
        ["--config=configs/polynomial.py", f"--workdir={tmp_path / 'run'}", "--config.tasks.options.degree=4"]
    )
    assert again.returncode == 1 and "tasks.options.degree (saved 2, now 4)" in again.stderr, again.stderr

    # A module that creates JAX arrays at import would start JAX before --cpu_devices and jax.distributed.
    (tmp_path / "eager_family.py").write_text(
        "import jax.numpy as jnp\nfrom examples.polynomial import Polynomial\nONE = jnp.ones(())\n"
    )
    for family, expected in (
        ("no_such_family_module:Family", "cannot import module 'no_such_family_module'"),
        ("eager_family:Polynomial", "importing module 'eager_family' started JAX's backends"),
    ):
        refused = helpers.run_cli(
            [
                "--config=configs/smoke.py",
                f"--workdir={tmp_path / 'refused'}",
                f"--config.tasks.family={family}",
            ],
            env_extra={"PYTHONPATH": f"{tmp_path}{os.pathsep}{helpers.REPO}"},
        )
        assert refused.returncode == 2 and expected in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "refused").exists()


def test_an_imported_family_s_source_is_part_of_the_compiled_step_s_fingerprint(tmp_path, monkeypatch):
    """Its loss is traced into the step: editing its module must not load the old executable."""
    from trainer import executables

    module = tmp_path / "edited_family.py"
    module.write_text("from examples.polynomial import Polynomial\n\n\nclass Edited(Polynomial):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = config_lib.family_config("edited_family:Edited")
    assert executables._family_source_digest(helpers.small_config()) == ""  # Built-in: the trainer's source.
    before = executables._family_source_digest(config)
    module.write_text(module.read_text() + "# an edit\n")
    assert before and executables._family_source_digest(config) != before
