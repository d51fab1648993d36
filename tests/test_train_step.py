"""The meta-update with unusable tasks: a poisoned task is left out, exactly, on one and on several devices."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from tests import helpers
from trainer import train
from trainer import train_step as train_step_lib

# Well-conditioned inner problems (every clean solve converges), so that exact agreement is a fair test.
CLEAN = {
    "inner.l2reg": 1.0,
    "inner.tol": 1e-10,
    "inner.maxiter": 500,
    "meta_grad.solver_tol": 1e-12,
    "meta_grad.solver_maxiter": 200,
    "train.meta_batch_size": 8,
    # SGD: the update is proportional to the meta-gradient (Adam's first step is lr * sign(g), blind to it).
    "outer.optimizer": "sgd",
    "outer.learning_rate": 0.1,
}
POISONED = 3


def _host_batch(config):
    backend, _, train_key = helpers.make_backend(config)
    return jax.tree.map(np.asarray, backend.sample_tasks(train_key, 0))


def _one_step(config, host_batch):
    """(host state after one step, host metrics) of the config's backend on the given task batch."""
    backend, host, _ = helpers.make_backend(config)
    sharding = getattr(backend, "task_sharding", None) or backend.device
    batch = jax.device_put(host_batch, sharding)
    state, metrics = backend.step(backend.put_state(host), batch)
    return backend.host_state(state), backend.metrics_to_host(metrics)


def _poison(batch, how):
    batch = jax.tree.map(np.copy, batch)
    if how == "nan":
        batch["support_y"][POISONED] = np.nan
    else:  # An inner solve forced to fail: targets no 3-iteration solve can fit.
        batch["support_y"][POISONED] *= 1e6
    return batch


def _flat(state):
    return np.asarray(ravel_pytree(state.meta_params)[0])


@pytest.fixture(scope="module")
def without_poisoned():
    """One step on the 7 clean tasks alone, on one device: the reference."""
    config = helpers.small_config(**CLEAN)
    batch = _host_batch(config)
    clean = jax.tree.map(lambda a: np.delete(a, POISONED, axis=0), batch)
    reference = helpers.small_config(**{**CLEAN, "train.meta_batch_size": 7})
    return batch, _one_step(reference, clean)


@pytest.mark.parametrize(
    "backend_name,num_devices,mapping",
    [("none", 1, "map"), ("shard_map", 1, "map"), ("shard_map", 4, "map"), ("shard_map", 4, "vmap")],
)
def test_nan_task_is_left_out_exactly(without_poisoned, backend_name, num_devices, mapping):
    """On 1 and 4 devices, tasks one after another (CPU's default) and vmapped (accelerators' default)."""
    batch, (ref_state, ref_metrics) = without_poisoned
    config = helpers.small_config(
        **CLEAN,
        **{
            "parallel.backend": backend_name,
            "parallel.num_devices": num_devices,
            "parallel.task_mapping": mapping,
        },
    )
    state, metrics = _one_step(config, _poison(batch, "nan"))
    assert int(metrics["inner_dropped_tasks"]) == 1
    assert int(metrics["inner_diverged_tasks"]) == 1
    assert float(ref_metrics["inner_converged_fraction"]) == 1.0  # the premise: clean solves converge
    # Equal to roundoff: vmapped kernels round differently from single-task ones (measured 3e-11 here);
    # far below what a change in which tasks are averaged would make.
    atol = 1e-12 if mapping == "map" else 1e-10
    np.testing.assert_allclose(_flat(state), _flat(ref_state), rtol=0, atol=atol)
    for name in ("query_loss", "support_loss", "grad_norm", "update_norm"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-8, err_msg=name)


def test_failed_solve_is_dropped_by_default_and_kept_on_request(without_poisoned):
    batch, _ = without_poisoned
    # 3 inner iterations: no task converges, so the residual limit is raised until only the poisoned task
    # (residual ~1e6) exceeds it.
    fields = {**CLEAN, "inner.maxiter": 3, "meta_grad.drop_residual_factor": 1e13}
    clean = jax.tree.map(lambda a: np.delete(a, POISONED, axis=0), batch)
    ref_state, _ = _one_step(helpers.small_config(**{**fields, "train.meta_batch_size": 7}), clean)
    state, metrics = _one_step(helpers.small_config(**fields), _poison(batch, "fail"))
    assert int(metrics["inner_dropped_tasks"]) == 1 and int(metrics["inner_diverged_tasks"]) == 0
    assert float(metrics["inner_residual_max"]) > 1e13 * fields["inner.tol"]
    np.testing.assert_allclose(_flat(state), _flat(ref_state), rtol=0, atol=1e-12)
    kept_state, kept_metrics = _one_step(
        helpers.small_config(**fields, **{"meta_grad.drop_tasks": "nonfinite"}), _poison(batch, "fail")
    )
    assert int(kept_metrics["inner_dropped_tasks"]) == 0
    assert np.abs(_flat(kept_state) - _flat(ref_state)).max() > 1e-6


def test_keep_everything_lets_a_nan_through(without_poisoned):
    batch, _ = without_poisoned
    config = helpers.small_config(**CLEAN, **{"meta_grad.drop_tasks": "none"})
    _, metrics = _one_step(config, _poison(batch, "nan"))
    assert int(metrics["inner_dropped_tasks"]) == 0
    assert not np.isfinite(metrics["support_loss"])
    with pytest.raises(train.NonFiniteError, match="1 of 8 tasks diverged"):
        train.check_finite(1, metrics, config)


def test_step_without_usable_tasks_changes_nothing_and_stops_the_run(without_poisoned):
    batch, _ = without_poisoned
    config = helpers.small_config(**CLEAN)
    _, host, _ = helpers.make_backend(config)
    all_bad = jax.tree.map(np.copy, batch)
    all_bad["support_y"][:] = np.nan
    state, metrics = _one_step(config, all_bad)
    assert int(metrics["inner_dropped_tasks"]) == 8
    np.testing.assert_array_equal(_flat(state), _flat(host))
    for new, old in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(host.opt_state), strict=True):
        np.testing.assert_array_equal(new, old)
    assert np.isfinite(metrics["query_loss"])
    with pytest.raises(train.UnusableStepsError, match="every one of the 8 tasks was dropped"):
        train.DropGuard(config).check(1, metrics)


def test_drop_guard_stops_after_consecutive_bad_steps():
    config = helpers.small_config(
        **{"meta_grad.max_dropped_fraction": 0.25, "meta_grad.max_dropped_steps": 3}
    )
    guard = train.DropGuard(config)
    metrics = lambda dropped: {
        "inner_dropped_tasks": np.float32(dropped),
        "inner_diverged_tasks": np.float32(0),
        "inner_residual_max": np.float32(1.0),
    }
    assert guard.check(1, metrics(0)) is None
    assert "dropped 1 of 8 tasks" in guard.check(2, metrics(1))  # 1/8 is not more than 25%: no streak
    guard.check(3, metrics(3))
    guard.check(4, metrics(3))
    guard.check(5, metrics(1))  # The streak is broken.
    guard.check(6, metrics(3))
    guard.check(7, metrics(3))
    with pytest.raises(train.UnusableStepsError, match="each of the last 3 steps"):
        guard.check(8, metrics(3))


def test_task_filter_policies():
    per_task = {
        "query_loss": np.array([1.0, np.nan, 1.0, 1.0]),
        "support_loss": np.array([1.0, 1.0, 1.0, 1.0]),
        "inner_residual": np.array([1e-9, 1e-9, 1e-3, 1e-9]),
    }
    grads = {"w": np.array([[1.0], [1.0], [1.0], [np.inf]])}
    keep = lambda policy: np.asarray(train_step_lib.TaskFilter(policy, max_residual=1e-6)(grads, per_task))
    np.testing.assert_array_equal(keep("unusable"), [True, False, False, False])
    np.testing.assert_array_equal(keep("nonfinite"), [True, False, True, False])
    np.testing.assert_array_equal(keep("none"), [True, True, True, True])
