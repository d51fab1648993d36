"""Test set-up: 8 simulated CPU devices and float64, set before JAX is imported; a shared compile cache."""

import os
import tempfile

# Before any JAX import: simulated devices for the sharding tests (tests never change this for users).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The suite runs on the CPU, also where a GPU build of JAX is installed (`make bench-gpu`).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache shared by the tests and the subprocesses they start: identical programs
# (the same small config compiled by several tests) compile once per session.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="imaml-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

from tests import helpers  # noqa: E402, F401


@pytest.fixture
def small_config():
    return helpers.small_config()
