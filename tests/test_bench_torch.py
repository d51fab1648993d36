"""The optional PyTorch reference of the Omniglot bench: skipped with its reason where PyTorch is missing (CI),
and where it is installed, one step of the official algorithm runs and is reported beside the rows."""

import subprocess
import sys

import pytest

from bench import omniglot as omniglot_bench

ROW = {
    "variant": "gd/patches/map",
    "step_s": 2.0,
    "step_s_min": 1.9,
    "step_s_max": 2.1,
    "first_call_s": 30.0,
    "inner_iterations": 16.0,
    "evaluations_per_task": 17.0,
    "gflop_per_step": 60.0,
    "gflops": 30.0,
}


def _result(pytorch):
    return dict(
        width=64,
        meta_batch=32,
        devices=2,
        steps=3,
        quick=False,
        platform="cpu",
        peak_gflops=60.0,
        rows=[ROW],
        pytorch=pytorch,
    )


def test_a_python_without_torch_skips_the_row_and_says_how_to_get_it():
    python = sys.executable
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("this Python has PyTorch")
    reference = omniglot_bench.pytorch_reference(python, 8, 2, 1, 1, log=lambda message: None)
    assert set(reference) == {"skipped"} and "BENCH_TORCH_PYTHON" in reference["skipped"]
    assert f"The official PyTorch code's step: skipped ({reference['skipped']})." in omniglot_bench.table(
        _result(reference)
    )


def test_a_measured_reference_is_reported_as_a_ratio_to_each_row():
    reference = dict(torch="2.0", threads=2, steps=3, step_s=8.0, step_s_min=7.5, step_s_max=9.0)
    line = omniglot_bench.table(_result(reference))[-1]
    assert "8.000 s [7.500-9.000]" in line and "gd/patches/map 4.00x as fast" in line


def test_the_official_step_runs_where_torch_is_installed(tmp_path):
    pytest.importorskip("torch")
    from bench import torch_imaml

    result = torch_imaml.main(["--width", "4", "--meta-batch", "2", "--threads", "1", "--steps", "1"])
    assert result["step_s"] > 0 and result["meta_batch"] == 2
