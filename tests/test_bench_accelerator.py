"""bench/accelerator.py (`make bench-gpu`): choosing and installing the CUDA build, the time budget, the
one-line errors, and `--platform cpu --quick` end to end (the whole measurement path, tiny sizes).

No GPU is needed: the device-independent parts are pure functions, and the end-to-end run is on CPU.
"""

import glob
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import sys
import types

import pytest

from bench import accelerator
from bench import omniglot as omniglot_bench
from tests import helpers

HEADER_550 = """\
Tue Mar  4 10:12:01 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:19:00.0 Off |                    0 |
"""
HEADER_580 = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.65.06              Driver Version: 580.65.06      CUDA Version: 13.0     |
+-----------------------------------------+------------------------+----------------------+
"""
HEADER_470 = """\
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 470.182.03   Driver Version: 470.182.03   CUDA Version: 11.4     |
|-------------------------------+----------------------+----------------------+
"""
HEADER_NA = "| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: N/A      |\n"
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)
JAX_VERSION = importlib.metadata.version("jax")


def _env(**changes):
    env = dict(os.environ)
    env["PYTHONPATH"] = helpers.REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(accelerator.JAX_CUDA_ENV, None)
    env.update(changes)
    return env


def _run(args, timeout=120, **env):
    return subprocess.run(
        [sys.executable, "-m", "bench.accelerator", *args],
        cwd=helpers.REPO,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bench.accelerator: error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize(
    "text, version",
    [
        (HEADER_550, (12, 4)),
        (HEADER_580, (13, 0)),
        (HEADER_470, (11, 4)),
        ("CUDA Version : 12.8", (12, 8)),
        (HEADER_NA, None),
        (NO_DRIVER, None),
        ("", None),
    ],
)
def test_parse_cuda_version(text, version):
    assert accelerator.parse_cuda_version(text) == version


def test_the_extra_follows_the_drivers_cuda_version():
    assert accelerator.extra_for_cuda((12, 4), "0.10.2") == "cuda12"
    assert accelerator.extra_for_cuda((12, 0), "0.10.2") == "cuda12"
    assert accelerator.extra_for_cuda((13, 0), "0.10.2") == "cuda13"
    assert accelerator.extra_for_cuda((14, 1), "0.10.2") == "cuda13"
    with pytest.raises(accelerator.UserError, match=r"CUDA 11\.4.*update the NVIDIA driver"):
        accelerator.extra_for_cuda((11, 4), "0.10.2")


def test_choose_extra_reads_nvidia_smi_unless_overridden():
    allowed = accelerator.cuda_extras()
    assert {"cuda12", "cuda13"} <= set(allowed)  # The installed jax's extras.
    assert accelerator.choose_extra(None, JAX_VERSION, allowed, lambda: HEADER_550) == "cuda12"
    assert accelerator.choose_extra(None, JAX_VERSION, allowed, lambda: HEADER_580) == "cuda13"
    never = lambda: pytest.fail("nvidia-smi read despite the override")
    assert accelerator.choose_extra("cuda13", JAX_VERSION, allowed, never) == "cuda13"
    with pytest.raises(accelerator.UserError, match="'cuda99'.*cuda12"):
        accelerator.choose_extra("cuda99", JAX_VERSION, allowed, never)
    with pytest.raises(accelerator.UserError, match="no 'CUDA Version: X.Y'.*JAX_CUDA=cuda12"):
        accelerator.choose_extra(None, JAX_VERSION, allowed, lambda: HEADER_NA)


def test_read_nvidia_smi_errors_name_what_is_missing():
    with pytest.raises(accelerator.UserError, match="nvidia-smi not found on PATH.*JAX_CUDA=cuda12"):
        accelerator.read_nvidia_smi(which=lambda name: None)
    failed = lambda *a, **k: types.SimpleNamespace(returncode=9, stdout=NO_DRIVER, stderr="")
    with pytest.raises(accelerator.UserError, match="nvidia-smi failed \\(NVIDIA-SMI has failed"):
        accelerator.read_nvidia_smi(which=lambda name: "/usr/bin/nvidia-smi", run=failed)
    ok = lambda *a, **k: types.SimpleNamespace(returncode=0, stdout=HEADER_580, stderr="")
    assert accelerator.read_nvidia_smi(which=lambda name: "/usr/bin/nvidia-smi", run=ok) == HEADER_580


def test_pip_command_installs_the_cuda_build_of_the_installed_jax():
    assert accelerator.pip_command("cuda12", "0.10.2") == [
        sys.executable,
        "-m",
        "pip",
        "install",
        "jax[cuda12]==0.10.2",
    ]
    assert accelerator.pip_command("cuda13", "0.10.2", python="/venv/bin/python")[-1] == "jax[cuda13]==0.10.2"


def test_install_runs_pip_then_itself_again_without_install(monkeypatch):
    monkeypatch.delenv(accelerator.JAX_CUDA_ENV, raising=False)
    argv = ["--install", "--cuda", "cuda13", "--platform", "gpu", "--time-budget-s", "300"]
    calls = []
    run = lambda command, **kwargs: calls.append(command) or types.SimpleNamespace(returncode=0)
    assert accelerator.install_and_rerun(accelerator.parse_args(argv), argv, print, run=run) == 0
    assert calls == [
        accelerator.pip_command("cuda13", JAX_VERSION),
        [sys.executable, "-m", "bench.accelerator", "--platform", "gpu", "--time-budget-s", "300"],
    ]
    # JAX_CUDA chooses the build too; a failed pip stops before measuring.
    monkeypatch.setenv(accelerator.JAX_CUDA_ENV, "cuda12")
    calls.clear()
    run = lambda command, **kwargs: calls.append(command) or types.SimpleNamespace(returncode=1)
    with pytest.raises(accelerator.UserError, match=r"pip install jax\[cuda12\]==.* failed"):
        accelerator.install_and_rerun(accelerator.parse_args(["--install"]), ["--install"], print, run=run)
    assert calls == [accelerator.pip_command("cuda12", JAX_VERSION)]
    assert accelerator.without_install(["--install", "--cuda=cuda12", "--quick"]) == ["--quick"]


def test_install_without_nvidia_smi_is_one_error_line():
    proc = _run(["--install", "--platform", "gpu"], PATH=os.path.join(helpers.REPO, "no-such-dir"))
    _assert_one_line_error(proc, "nvidia-smi not found on PATH", "JAX_CUDA=cuda12")


def test_install_with_the_cpu_platform_is_refused():
    _assert_one_line_error(_run(["--install", "--platform", "cpu"]), "--platform gpu")


def test_no_gpu_visible_to_jax_is_one_error_line():
    # JAX restricted to its CPU backend: what a machine without a working CUDA plugin sees.
    proc = _run(["--platform", "gpu"], JAX_PLATFORMS="cpu")
    _assert_one_line_error(proc, "no GPU visible to JAX", "--install")


def test_the_budget_skips_rows_predicted_to_overrun():
    now = [0.0]
    budget = accelerator.Budget(100.0, clock=lambda: now[0])
    measured = []

    def measure(spec):  # Each row takes 30 s of the fake clock.
        measured.append(spec["n"])
        now[0] += 30.0
        if spec["n"] == 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore detail")
        return {"step_s": 1.0}

    rows = accelerator.run_rows([{"n": n} for n in range(1, 6)], measure, budget, lambda m: None)
    # At 60 s the previous row's 30 s still fits in 100 s; at 90 s it does not.
    assert measured == [1, 2, 3]
    assert rows[0] == {"n": 1, "step_s": 1.0, "wall_s": 30.0}
    assert rows[1]["error"] == "RuntimeError: RESOURCE_EXHAUSTED: out of memory"
    assert all(r["skipped"].startswith("skipped: time budget 100 s, 10 s left") for r in rows[3:])
    # A part with half the budget: none of its rows start past 50 s.
    half = accelerator.run_rows([{"n": 9}], measure, budget, lambda m: None, share=0.5)
    assert "skipped: time budget 100 s (50% of it for this part), 0 s left" in half[0]["skipped"]


def test_a_failed_cuda_plugin_is_held_back_and_told_in_one_line():
    with accelerator.captured_log() as records:
        logger = logging.getLogger("jax._src.xla_bridge")
        try:
            raise RuntimeError("operation cuInit(0) failed: Unknown CUDA error 303\nmore")
        except RuntimeError:
            logger.exception("Jax plugin configuration error: Exception when calling initialize()")
        logger.warning("CUDA backend failed to initialize.\nsecond line")
        logger.info("not kept")
    assert [accelerator.record_reason(r) for r in records] == [
        "RuntimeError: operation cuInit(0) failed: Unknown CUDA error 303",
        "CUDA backend failed to initialize.",
    ]
    assert logging.getLogger("jax._src.xla_bridge").propagate


def test_the_table_notes_skipped_and_failed_rows():
    results = dict(
        date="2025-01-01 00:00:00",
        mode="default",
        time_budget_s=420.0,
        total_s=400.0,
        machine=dict(
            platform="gpu",
            device_kind="NVIDIA H100 80GB HBM3",
            devices=8,
            jax="0.10.2",
            jaxlib="0.10.2",
            cuda_plugins={"jax-cuda12-plugin": "0.10.2"},
        ),
        sinusoid=dict(
            mapping="vmap",
            dtype="float64",
            hidden_sizes=[20, 20, 20],
            num_params=901,
            l2reg=1.0,
            inner_maxiter=500,
            inner_tol=1e-8,
            linesearch="zoom",
            reps=5,
            rows=[
                dict(
                    num_tasks=32,
                    step_s=dict(median=0.5, min=0.4, max=0.6, samples=[0.4, 0.5, 0.6]),
                    tasks_per_s=64.0,
                    compile_s=20.0,
                    inner_iterations_mean=100.0,
                    inner_iterations_max=500.0,
                ),
                dict(num_tasks=4096, skipped="skipped: time budget 420 s, 3 s left"),
            ],
        ),
        omniglot=dict(
            steps=3,
            conv_blocks=4,
            image_size=28,
            inner_maxiter=16,
            cg_steps=5,
            overrides={},
            rows=[
                dict(
                    width=64,
                    meta_batch=32,
                    variant="gd/xla/vmap",
                    error="XlaRuntimeError: RESOURCE_EXHAUSTED",
                )
            ],
        ),
    )
    table = accelerator.markdown(results)
    assert "# Meta-step on NVIDIA H100 80GB HBM3 (gpu)" in table
    assert "jax 0.10.2, jaxlib 0.10.2 (jax-cuda12-plugin 0.10.2)" in table
    assert "| 32 | 0.5 [0.4–0.6] (3) | 64 | 20 | 100 / 500 |" in table
    assert "| 4096 | skipped: time budget 420 s, 3 s left |" in table
    assert "| 64 | 32 | gd/xla/vmap | error: XlaRuntimeError: RESOURCE_EXHAUSTED |" in table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("accelerator")
    proc = _run(["--platform", "cpu", "--quick", "--out-dir", str(out_dir)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md_path,) = glob.glob(str(out_dir / "*_accelerator-quick.md"))
    (json_path,) = glob.glob(str(out_dir / "*_accelerator-quick.json"))
    with open(md_path) as f:
        table = f.read()
    with open(json_path) as f:
        results = json.load(f)
    return proc.stdout, table, results


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_cpu_run_writes_a_row_per_size_and_variant(quick_run):
    stdout, table, results = quick_run
    assert table.strip() == stdout.strip()
    machine = results["machine"]
    assert machine["platform"] == "cpu" and machine["device_kind"] and machine["jax"] == JAX_VERSION
    assert f"jax {JAX_VERSION}, jaxlib {machine['jaxlib']}" in table

    sinusoid = results["sinusoid"]["rows"]
    assert [r["num_tasks"] for r in sinusoid] == list(accelerator.QUICK_SINUSOID_TASKS)
    for row in sinusoid:
        assert "skipped" not in row and "error" not in row, row
        step = row["step_s"]
        assert all(_positive(s) for s in step["samples"]) and len(step["samples"]) >= 2
        assert _positive(row["tasks_per_s"]) and _positive(row["compile_s"])
        assert f"| {row['num_tasks']} | " in table

    omniglot = results["omniglot"]["rows"]
    assert [(r["width"], r["meta_batch"], r["variant"]) for r in omniglot] == [
        (w, b, v) for w, b in omniglot_bench.QUICK_SETTINGS for v in accelerator.OMNIGLOT_VARIANTS
    ]
    for row in omniglot:
        assert "skipped" not in row and "error" not in row, row
        for key in ("step_s", "tasks_per_s", "first_call_s", "evaluations_per_task", "gflops"):
            assert _positive(row[key]), (key, row)
        assert f"| {row['width']} | {row['meta_batch']} | {row['variant']} | " in table
