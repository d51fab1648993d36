"""Config validation: every bad value is refused before any work, naming the field and what was expected."""

import importlib

import pytest

from tests import helpers
from trainer import config as config_lib


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("inner.l2reg", -1.0, "inner.l2reg"),
        ("inner.maxiter", 0, "inner.maxiter"),
        ("meta_grad.estimator", "magic", "meta_grad.estimator"),
        ("train.meta_batch_size", 0, "train.meta_batch_size"),
        ("meta_grad.linear_solver", "lu", "meta_grad.linear_solver"),
        ("parallel.backend", "mpi", "parallel.backend"),
        ("outer.learning_rate", float("nan"), "outer.learning_rate"),
    ],
)
def test_invalid_values_name_the_field(field, value, expected):
    config = config_lib.default_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(config_lib.ConfigError, match=expected):
        config_lib.validate(config)


def test_unknown_field_is_refused():
    config = config_lib.default_config()
    config.inner.typo_field = 3
    with pytest.raises(config_lib.ConfigError, match="inner.typo_field"):
        config_lib.validate(config)


def test_float32_with_unreachable_tolerance_is_refused():
    config = config_lib.default_config()
    config.model.dtype = "float32"
    config.inner.tol = 1e-12
    with pytest.raises(config_lib.ConfigError, match="inner.tol"):
        config_lib.validate(config)


def test_batch_not_divisible_by_devices_names_both_numbers_and_valid_sizes():
    config = helpers.small_config(**{"train.meta_batch_size": 10})
    with pytest.raises(config_lib.ConfigError, match=r"= 10 .* 4 devices.*\[8, 12\]"):
        config_lib.check_device_count(config, 4)


@pytest.mark.parametrize(
    "path",
    [
        "configs/sinusoid.py",
        "configs/sinusoid_notebook.py",
        "configs/notebook.py",
        "configs/smoke.py",
        "configs/sinusoid_finn.py",
        "configs/omniglot.py",
    ],
)
def test_shipped_configs_are_valid(path):
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))  # configs is a package
    config_lib.validate(module.get_config())
    assert "Run:" in module.__doc__ or "python -m trainer.main" in module.__doc__


def test_cli_rejects_unknown_key_before_any_work(tmp_path):
    proc = helpers.run_cli(
        ["--config=configs/smoke.py", f"--workdir={tmp_path}/w", "--config.inner.not_a_field=1"]
    )
    assert proc.returncode == 2
    assert "unknown config field 'inner.not_a_field'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "config, option, expected",
    [
        ("configs/smoke.py", "degree", "declares no such option"),
        ("configs/polynomial.py", "degre", "did you mean tasks.options.degree?"),
    ],
)
def test_cli_names_a_family_option_the_family_does_not_declare(tmp_path, config, option, expected):
    proc = helpers.run_cli(
        [f"--config={config}", f"--workdir={tmp_path}/w", f"--config.tasks.options.{option}=2"]
    )
    assert proc.returncode == 2 and f"unknown config field 'tasks.options.{option}'" in proc.stderr
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("case", ["missing file", "syntax error", "wrong type", "no workdir"])
def test_cli_input_errors_are_one_line_with_status_2(tmp_path, case):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    args = {
        "missing file": ["--config=configs/no_such_config.py", f"--workdir={tmp_path}/w"],
        "syntax error": [f"--config={broken}", f"--workdir={tmp_path}/w"],
        "wrong type": [
            "--config=configs/smoke.py",
            f"--workdir={tmp_path}/w",
            "--config.train.num_steps=abc",
        ],
        "no workdir": ["--config=configs/smoke.py"],
    }[case]
    proc = helpers.run_cli(args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "w").exists()


def test_cli_rejects_invalid_value_before_any_work(tmp_path):
    proc = helpers.run_cli(
        ["--config=configs/smoke.py", f"--workdir={tmp_path}/w", "--config.inner.l2reg=-0.5"]
    )
    assert proc.returncode != 0
    assert "inner.l2reg" in proc.stderr and "> 0" in proc.stderr
    assert not (tmp_path / "w").exists()
    proc = helpers.run_cli(
        ["--config=configs/smoke.py", f"--workdir={tmp_path}/w", "--config.meta_grad.estimator=magic"]
    )
    assert proc.returncode != 0
    assert "meta_grad.estimator" in proc.stderr and "implicit" in proc.stderr


def test_flatten_reads_a_config_and_its_saved_form_alike():
    config = config_lib.family_config("examples.polynomial:Polynomial")
    flat = config_lib.flatten(config)
    saved = config_lib.flatten(config_lib.to_dict(config))
    assert set(flat) == set(saved) and "tasks.options.degree" in flat and "inner.l2reg" in flat
    assert saved["model.hidden_sizes"] == list(
        flat["model.hidden_sizes"]
    )  # JSON's lists, the schema's tuples
    kept = config_lib.flatten(config, keep=("tasks.options",))
    assert (
        "tasks.options.degree" not in kept and kept["tasks.options"]["degree"] == flat["tasks.options.degree"]
    )


def test_a_saved_config_is_completed_by_the_defaults_and_checked():
    saved = config_lib.to_dict(helpers.small_config())
    del saved["meta_grad"]["damping"]  # Written before the field existed.
    saved["inner"]["l2reg"] = 3.0
    config = config_lib.from_saved(saved, "config.json")
    assert config.meta_grad.damping == config_lib.default_config().meta_grad.damping
    assert config.inner.l2reg == 3.0 and config.model.hidden_sizes == (8, 8)
    saved["inner"]["l2reg"] = "abc"
    with pytest.raises(config_lib.ConfigError, match=r"^config.json: field 'inner.l2reg' = 'abc'"):
        config_lib.from_saved(saved, "config.json")
    saved["inner"]["l2reg"] = -1.0
    with pytest.raises(config_lib.ConfigError, match=r"^config.json: .*inner.l2reg"):
        config_lib.from_saved(saved, "config.json")
