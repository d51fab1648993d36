"""`python -m bench.run --quick` end to end: the table and the JSON are written, and their numbers make sense.

No timing is asserted (the machine may be loaded); only what is deterministic: memory analysis, relative
errors against the exact meta-gradient, and which measurements were run.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from bench.accuracy import LOOSE_KEY
from tests import helpers


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = helpers.REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out-dir", str(out_dir)],
        cwd=helpers.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md_path,) = glob.glob(str(out_dir / "*-quick.md"))
    (json_path,) = glob.glob(str(out_dir / "*-quick.json"))
    with open(md_path) as f:
        table = f.read()
    with open(json_path) as f:
        results = json.load(f)
    return proc.stdout, table, results


@pytest.mark.slow
def test_quick_writes_the_table_to_stdout_and_results(quick_run):
    stdout, table, results = quick_run
    assert table.strip() == stdout.strip()
    for heading in (
        "## 1. Throughput",
        "## 2. Scaling",
        "## 3. Memory",
        "## 4. Meta-gradient estimators",
        "## 5. A resumed run's compile",
        "## 6. The Omniglot meta-step",
    ):
        assert heading in table
    assert results["mode"] == "quick"
    machine = results["machine"]
    assert machine["cpu_cores"] >= 1 and machine["jax"] and machine["platform"]
    assert set(results["sections"]) == {"throughput", "scaling", "memory", "accuracy", "cache", "omniglot"}


@pytest.mark.slow
def test_quick_throughput_chunks_the_notebook_loop_and_shards_the_project(quick_run):
    _, table, results = quick_run
    rows = {row["num_tasks"]: row for row in results["sections"]["throughput"]["rows"]}
    assert rows[2]["notebook"]["compiled_tasks"] == 2 and rows[2]["speedup"]["map"] > 0
    # Above --baseline-max-tasks: the 2-task program runs on 2 chunks, and is not compiled again.
    assert rows[4]["notebook"]["compiled_tasks"] == 2
    assert rows[4]["notebook"]["compile_s"] == rows[2]["notebook"]["compile_s"]
    assert "notebook loop (2 chunks of 2)" in table
    cores = results["machine"]["cpu_cores_usable"]
    for num_tasks, row in rows.items():
        for project in row["project"].values():
            step = project["step_s"]
            assert 0 < step["min"] <= step["median"] <= step["max"] and len(step["samples"]) >= 2
        if cores > 1 and num_tasks % cores == 0:  # The usable cores as CPU devices, in a subprocess.
            assert row["project"][f"map, {cores} devices"]["devices"] == cores
    # Same tasks, same L-BFGS settings: both formulations' inner solves take about the same iterations (not
    # exactly: the project's L-BFGS works on the ravelled parameters, so its sums round differently).
    for num_tasks in (2, 4):
        notebook, project = rows[num_tasks]["notebook"], rows[num_tasks]["project"]["map"]
        assert project["inner_iterations_mean"] == pytest.approx(notebook["inner_iterations_mean"], rel=0.15)
    assert "Compile time of the project's step (map, one device)" in table
    compiles = results["sections"]["throughput"]["compile_times"]
    assert sorted(compiles["by_tasks"]) == ["2", "4"] and compiles["max_over_min"] >= 1
    # The project at the looser inner tolerance, with that tolerance's meta-gradient error beside it.
    loose_tol = results["settings"]["loose_inner_tol"]
    assert all(f"map, inner tol {loose_tol:g}" in row["project"] for row in rows.values())
    loose_error = next(
        r["rel_error_of_mean"] for r in results["sections"]["accuracy"]["rows"] if r["key"] == LOOSE_KEY
    )
    assert f"| project, map, inner tol {loose_tol:g} |" in table and f"{loose_error:.1e}" in table


@pytest.mark.slow
def test_quick_scaling_ran_each_device_count_in_a_subprocess(quick_run):
    _, _, results = quick_run
    rows = results["sections"]["scaling"]["rows"]
    assert [(r["platform"], r["devices"]) for r in rows] == [("cpu", 1), ("cpu", 2)]
    for row in rows:
        assert "error" not in row, row
        assert row["visible_devices"] == row["devices"]
    assert rows[0]["efficiency"] == 1.0


@pytest.mark.slow
def test_quick_memory_is_flat_for_implicit_and_grows_for_unrolled(quick_run):
    _, _, results = quick_run
    temp = {(r["estimator"], r["maxiter"]): r["temp_bytes"] for r in results["sections"]["memory"]["rows"]}
    assert temp["implicit", 5] == temp["implicit", 20]
    assert temp["unrolled", 20] > 2 * temp["unrolled", 5]


@pytest.mark.slow
def test_quick_estimator_errors_against_the_exact_meta_gradient(quick_run):
    _, _, results = quick_run
    accuracy = results["sections"]["accuracy"]
    assert accuracy["reference_residual_max"] <= accuracy["reference_tol"]
    errors = {row["key"]: row["rel_error_of_mean"] for row in accuracy["rows"]}
    assert set(errors) == {
        "implicit_default",
        LOOSE_KEY,
        "implicit_cg1",
        "first_order",
        "unrolled",
        "notebook",
    }
    assert all(math.isfinite(e) for e in errors.values())
    # Both formulations compute the implicit meta-gradient: close to the exact one (the quick run's inner
    # solves stop at 30 iterations, hence not closer), and much closer than one CG iteration or first order.
    assert errors["implicit_default"] < 0.05 and errors["notebook"] < 0.05
    assert errors["implicit_cg1"] > 5 * errors["implicit_default"]
    assert errors["first_order"] > 5 * errors["implicit_default"]
    # A looser inner tolerance (1e-2 against 1e-6) solves less accurately: a larger meta-gradient error.
    assert errors["implicit_loose_inner_tol"] > errors["implicit_default"]


@pytest.mark.slow
def test_quick_cache_compiles_then_reads_the_cache_then_loads_the_executable(quick_run):
    _, table, results = quick_run
    cache = results["sections"]["cache"]
    assert "error" not in cache, cache
    runs = cache["runs"]
    # The first run compiles and saves; a resumed run on the same folder loads what it saved.
    assert [runs[name]["source"] for name in ("first", "cache_only", "resumed")] == [
        "compiled",
        "lower().compile()",
        "loaded",
    ]
    assert runs["cache_only"]["lower_s"] > 0
    assert all(run["compile_s"] > 0 for run in runs.values())
    assert cache["ratio"] == runs["resumed"]["compile_s"] / runs["first"]["compile_s"]
    assert "the saved executable loaded" in table


def test_bad_arguments_are_rejected_with_the_allowed_values(capsys):
    from bench import run

    with pytest.raises(SystemExit):
        run.parse_args(["--sections", "throughput,speed"])
    assert "expected some of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--task-counts", "4,0"])
    assert "positive integers" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_omniglot_section_measures_each_variant(quick_run):
    """The Omniglot section: one row per variant with its time, evaluations, FLOPs and the machine's peak."""
    _, table, results = quick_run
    (setting,) = results["sections"]["omniglot"]["settings"]
    assert setting["peak_gflops"] > 0 and setting["platform"] == "cpu"
    assert [r["variant"] for r in setting["rows"]] == ["lbfgs/xla/map", "gd/patches/vmap"]
    for row in setting["rows"]:
        assert row["step_s"] > 0 and row["gflops"] > 0 and row["flops"]["evaluation"] > 0
        assert f"| {row['variant']} |" in table
    assert setting["rows"][1]["evaluations_per_task"] == 3.0  # iMAML-GD: 2 steps, 3 gradient evaluations
