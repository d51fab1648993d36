"""How one device maps a function over its tasks: `jax.vmap` or `lax.map`, chosen once per run.

`task_mapping(config)` is the only place that reads `parallel.task_mapping`; the train step and every
evaluation take its result ("vmap" or "map") as an argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

MAPPINGS = ("vmap", "map")


def task_mapping(config: ml_collections.ConfigDict) -> str:
    """ "vmap" or "map" for `parallel.task_mapping`; "auto" gives "map" on CPU, where it is faster (bench), and
    "vmap" on accelerators."""
    mapping = config.parallel.task_mapping
    if mapping == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return mapping


def map_tasks(fn: Callable, mapping: str, *batched) -> Any:
    """`fn` over the leading task axis of `batched`: vmapped, or one task after another with lax.map."""
    if mapping == "vmap":
        return jax.vmap(fn)(*batched)
    if mapping == "map":
        return jax.lax.map(lambda args: fn(*args), batched)
    raise ValueError(f"task mapping {mapping!r}: expected one of {MAPPINGS}")
