"""The train step's saved executable (trainer/executables.py): same results as a fresh compilation, a
fingerprint that changes with the program and only with it, damaged files reported and recompiled."""

from __future__ import annotations

import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from trainer import config as config_lib
from trainer import executables


def _setup(config):
    backend, host, train_key = helpers.make_backend(config)
    return backend, host, backend.sample_tasks(train_key, 0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-device shard_map step compiled once and saved; (config, backend, host state, batch, dir, key).

    Its lambda is drawn at random so that no earlier test or session put the program in the shared
    compilation cache: only a fresh compilation is saved.
    """
    fields = {"parallel.backend": "shard_map", "parallel.num_devices": 2, "inner.l2reg": 1 + random.random()}
    config = helpers.small_config(**fields)
    backend, host, batch = _setup(config)
    directory = str(tmp_path_factory.mktemp("executables"))
    args = (backend.put_state(host), batch)
    key = executables.fingerprint(config, backend.devices, args)
    messages = []
    _, source, _ = executables.load_or_compile(
        backend.step, args, directory, key, backend.devices, messages.append
    )
    assert source == "compiled"
    assert "saved to" in messages[0] and os.listdir(directory) == [os.path.basename(_path(directory))]
    return config, backend, host, batch, directory, key


def _path(directory):
    (name,) = [n for n in os.listdir(directory) if n.endswith(executables.SUFFIX)]
    return os.path.join(directory, name)


def test_loaded_step_is_bitwise_the_jitted_step_and_donates_the_state(saved):
    config, backend, host, batch, directory, key = saved
    messages = []
    loaded, source, seconds = executables.load_or_compile(
        backend.step, (backend.put_state(host), batch), directory, key, backend.devices, messages.append
    )
    assert source == "loaded" and seconds > 0 and "loaded" in messages[0]
    state = backend.put_state(host)
    loaded_state, loaded_metrics = loaded(state, batch)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # Donated, as by the jitted step.
    jit_state, jit_metrics = backend.step(backend.put_state(host), batch)
    # Two steps from the loaded executable (its output state is a valid input) against two jitted steps.
    loaded_state, _ = loaded(loaded_state, batch)
    jit_state, _ = backend.step(jit_state, batch)
    for a, b in zip(jax.tree.leaves(loaded_state), jax.tree.leaves(jit_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in jit_metrics:
        np.testing.assert_array_equal(np.asarray(loaded_metrics[name]), np.asarray(jit_metrics[name]), name)


def test_fingerprint_follows_the_program_only(saved, monkeypatch):
    config, backend, host, batch, _, key = saved
    args = (backend.put_state(host), batch)

    def key_of(fields=None, devices=backend.devices, inputs=args):
        return executables.fingerprint(config_lib.with_fields(config, fields or {}), devices, inputs)

    assert key_of() == key
    # Bookkeeping fields, and the length of a run with a constant learning rate, leave the program alone.
    same = {
        "eval.every_steps": 7,
        "logging.every_steps": 3,
        "checkpoint.every_steps": 5,
        "train.num_steps": 99,
    }
    assert key_of(same) == key
    changed = {
        "lambda": key_of({"inner.l2reg": 0.5}),
        "tasks": key_of({"tasks.num_support": 7}),
        "layout": key_of({"parallel.task_mapping": "vmap"}),
        "cosine schedule": key_of({"outer.schedule": "cosine"}),
        "its length": key_of({"outer.schedule": "cosine", "train.num_steps": 99}),
        "devices": key_of(devices=jax.devices()[2:4]),
        "input shapes": key_of(inputs=(args[0], jax.tree.map(lambda x: jnp.concatenate([x, x]), batch))),
    }
    monkeypatch.setattr(executables, "_source_digest", lambda: "edited trainer code")
    changed["source"] = key_of()
    assert len(set(changed.values()) | {key}) == len(changed) + 1, changed


def test_damaged_executable_is_reported_and_compiled_again(saved, tmp_path):
    _, backend, host, batch, directory, key = saved
    path = _path(str(directory))
    damaged = tmp_path / os.path.basename(path)
    damaged.write_bytes(open(path, "rb").read()[:1000])
    args = (backend.put_state(host), batch)
    messages = []
    _, source, _ = executables.load_or_compile(
        backend.step, args, str(tmp_path), key, backend.devices, messages.append
    )
    assert source == "compiled"
    assert f"cannot load {damaged}" in messages[0] and "removed, compiling again" in messages[0]
    assert "saved to" in messages[1]  # In-process, the fixture's own executable: a good file replaces it.
    _, source, _ = executables.load_or_compile(backend.step, args, str(tmp_path), key, backend.devices, print)
    assert source == "loaded"


def test_a_step_read_from_the_compilation_cache_is_not_saved(saved, tmp_path):
    _, backend, host, batch, _, key = saved
    jax.clear_caches()  # As in a new process: the program now comes from the persistent cache (conftest).
    messages = []
    _, source, _ = executables.load_or_compile(
        backend.step, (backend.put_state(host), batch), str(tmp_path), key, backend.devices, messages.append
    )
    assert source == "compiled" and "not saved" in messages[0]
    assert not os.listdir(tmp_path)


def test_disabled_or_unsupported_runs_use_the_jitted_step(saved, tmp_path):
    config, backend, host, batch, _, _ = saved
    args = (backend.put_state(host), batch)
    no_cache = config_lib.with_fields(config, {"compile_cache_dir": "none"})
    assert executables.train_step_for_run(backend, no_cache, str(tmp_path), *args) == (
        backend.step,
        "jit",
        0.0,
    )
    assert not os.listdir(tmp_path)
