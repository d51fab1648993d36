"""trainer/mapping.py: the one decision of how a device maps over its tasks, and the two mappings agreeing."""

import chex
import jax
import jax.numpy as jnp
import pytest

from tests import helpers
from trainer import mapping


def test_auto_maps_on_cpu_and_explicit_values_are_kept():
    assert jax.default_backend() == "cpu"  # The suite's platform (tests/conftest.py).
    assert mapping.task_mapping(helpers.small_config(**{"parallel.task_mapping": "auto"})) == "map"
    for value in ("vmap", "map"):
        assert mapping.task_mapping(helpers.small_config(**{"parallel.task_mapping": value})) == value


def test_vmap_and_map_equal_a_python_loop_on_pytrees():
    def fn(x, y):  # A pytree out of two batched arguments, with a reduction that vmap batches.
        return {"sum": jnp.sum(x * y), "pair": (x + 1.0, jnp.max(y))}

    xs = jnp.arange(12.0).reshape(4, 3)
    ys = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    loop = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[fn(xs[i], ys[i]) for i in range(4)])
    for name in mapping.MAPPINGS:
        chex.assert_trees_all_close(mapping.map_tasks(fn, name, xs, ys), loop, rtol=0, atol=1e-12)


def test_an_unknown_mapping_is_refused():
    with pytest.raises(ValueError, match="'pmap'.*expected one of"):
        mapping.map_tasks(lambda x: x, "pmap", jnp.zeros(2))
