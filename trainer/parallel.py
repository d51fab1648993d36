"""Where the meta-step runs: `shard_map` over a 1-D `tasks` mesh (default), `pmap`, or one device (`none`).

Every backend offers the same four operations to the train loop:
  put_state(host_state)      -> the state replicated on the backend's devices
  host_state(state)          -> numpy copy of the (replicated) state, for checkpoints and evaluation
  sample_tasks(key, step)    -> the step's task batch, each device sampling only its own slice of tasks
                                (from the family's data, e.g. Omniglot's images, placed once on every device)
  step(state, task_batch)    -> (state, metrics); jitted once, state donated, metrics replicated

Tasks are indexed globally (0..B-1) and task i of step s comes from fold_in(fold_in(key, s), i), so the
tasks of a step do not depend on the number of devices or processes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from trainer import config as config_lib
from trainer import model as model_lib

AXIS = "tasks"


def select_devices(num_devices: int) -> list[jax.Device]:
    """The first `num_devices` global devices (all when 0), with a clear error if there are fewer."""
    devices = jax.devices()
    if num_devices == 0:
        return devices
    if num_devices > len(devices):
        raise config_lib.ConfigError(
            f"config field 'parallel.num_devices' = {num_devices} but only {len(devices)} device(s) are visible "
            f"({devices[0].platform}); use 0 for all of them"
        )
    if jax.process_count() > 1 and num_devices != len(devices):
        # A mesh must hold devices of every process: each process runs the same program on its own devices.
        raise config_lib.ConfigError(
            f"config field 'parallel.num_devices' = {num_devices}: a run with {jax.process_count()} "
            f"processes uses all {len(devices)} global devices; set it to 0 (or {len(devices)})"
        )
    return devices[:num_devices]


def make_mesh(devices: list[jax.Device]) -> jax.sharding.Mesh:
    # Auto axis type: jax.make_mesh defaults to Explicit axes, which refuse unsharded inputs to shard_map.
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


class _Backend:
    name = "base"

    def __init__(self, config: ml_collections.ConfigDict, local_step, family, data):
        self.family = family
        self.host_data = (
            data  # The training tasks' host data (None for sinusoid), placed once on the devices.
        )
        self.batch_size = config.train.meta_batch_size
        self.dtype = model_lib.dtype_of(config)
        self._local_step = local_step

    def _sample(self, data, task_key, step, task_indices):
        return self.family.sample(data, task_key, step, task_indices, self.dtype)

    @staticmethod
    def metrics_to_host(metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in metrics.items()}


class SingleDevice(_Backend):
    """The whole meta-batch on one device (its tasks mapped as the step's task_mapping says)."""

    name = "none"

    def __init__(self, config, local_step, family, data, device=None):
        super().__init__(config, local_step, family, data)
        self.device = device or jax.devices()[0]
        self.data = jax.device_put(self.host_data, self.device)
        self.devices = [self.device]
        self.num_devices = 1
        self.step = jax.jit(self._local_step, donate_argnums=0)
        self._sample_jit = jax.jit(self._sample)

    def put_state(self, host_state):
        return jax.device_put(host_state, self.device)

    def host_state(self, state):
        return jax.tree.map(np.asarray, state)

    def sample_tasks(self, task_key, step):
        indices = jnp.arange(self.batch_size)
        return self._sample_jit(self.data, task_key, jnp.asarray(step, jnp.int32), indices)


class ShardMap(_Backend):
    """`jax.shard_map` over a 1-D mesh: each device maps the step over its own tasks; the sums of their
    meta-gradients are all-reduced with psum."""

    name = "shard_map"

    def __init__(self, config, local_step, family, data, devices):
        super().__init__(config, local_step, family, data)
        self.devices = devices
        self.num_devices = len(devices)
        self.mesh = make_mesh(devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.task_sharding = NamedSharding(self.mesh, P(AXIS))
        local_step = functools.partial(self._local_step, axis_name=AXIS)
        # check_vma=False: jaxopt's line search has cond branches whose outputs differ in varying-ness.
        sharded_step = jax.shard_map(
            local_step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False
        )
        self.step = jax.jit(
            sharded_step,
            in_shardings=(self.replicated, self.task_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )
        self.data = self.put_state(self.host_data)  # Replicated: every device samples from all of it.
        sharded_sample = jax.shard_map(
            self._sample,
            mesh=self.mesh,
            in_specs=(P(), P(), P(), P(AXIS)),
            out_specs=P(AXIS),
            check_vma=False,
        )
        self._sample_jit = jax.jit(sharded_sample, out_shardings=self.task_sharding)
        # Each process builds only the indices of its own devices' tasks.
        all_indices = np.arange(self.batch_size, dtype=np.int32)
        self.task_indices = jax.make_array_from_callback(
            (self.batch_size,), self.task_sharding, lambda idx: all_indices[idx]
        )

    def put_state(self, host_state):
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

        return jax.tree.map(put, host_state)

    def host_state(self, state):
        return jax.tree.map(np.asarray, state)

    def sample_tasks(self, task_key, step):
        return self._sample_jit(self.data, task_key, jnp.asarray(step, jnp.int32), self.task_indices)


class Pmap(_Backend):
    """`jax.pmap` over the local devices (kept for users on it); state carries a leading device axis."""

    name = "pmap"

    def __init__(self, config, local_step, family, data, devices):
        super().__init__(config, local_step, family, data)
        self.devices = [d for d in devices if d.process_index == jax.process_index()]
        self.num_devices = len(devices)
        self.num_local = len(self.devices)
        local_step = functools.partial(self._local_step, axis_name=AXIS)
        self.step = jax.pmap(local_step, axis_name=AXIS, devices=devices, donate_argnums=0)
        self._sample_pmap = jax.pmap(self._sample, in_axes=(0, None, None, 0), devices=devices)
        # Placing the state through pmap gives it the same device layout as the step's outputs (no recompile).
        self._replicate = jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)
        per_device = self.batch_size // self.num_devices
        first = jax.process_index() * self.num_local * per_device  # devices are ordered by process
        self.task_indices = np.arange(first, first + self.num_local * per_device, dtype=np.int32).reshape(
            self.num_local, per_device
        )
        # One copy per local device (a leading device axis), placed once rather than sent with every step.
        self.data = None if self.host_data is None else self.put_state(self.host_data)

    def put_state(self, host_state):
        stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * self.num_local), host_state)
        return self._replicate(stacked)

    def host_state(self, state):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], state)

    def sample_tasks(self, task_key, step):
        return self._sample_pmap(self.data, task_key, jnp.asarray(step, jnp.int32), self.task_indices)

    @staticmethod
    def metrics_to_host(metrics):
        return {k: np.asarray(v.addressable_data(0))[0] for k, v in metrics.items()}


def make_backend(config: ml_collections.ConfigDict, local_step, family, data) -> Any:
    """The backend named by `parallel.backend`, running `local_step` (`train_step.make_train_step`'s
    `(state, task_batch, axis_name=None) -> (state, metrics)`) on its devices, with the tasks sampled by `family`
    from `data` (its training data, `family.load_data(config).train`). Checks the meta-batch splits evenly
    before compiling. `backend.step` is the jitted step; `executables.train_step_for_run` gives the loop its
    callable.
    """
    name = config.parallel.backend
    if name == "none":
        if jax.process_count() > 1:
            raise config_lib.ConfigError(
                f"config field 'parallel.backend' = 'none' runs on one device, but this run has "
                f"{jax.process_count()} processes; use 'shard_map' (or 'pmap')"
            )
        config_lib.check_device_count(config, 1)
        return SingleDevice(config, local_step, family, data)
    devices = select_devices(config.parallel.num_devices)
    config_lib.check_device_count(config, len(devices))
    if name in ("shard_map", "pmap"):
        backend_class = ShardMap if name == "shard_map" else Pmap
        return backend_class(config, local_step, family, data, devices)
    raise config_lib.ConfigError(
        f"config field 'parallel.backend' = {name!r}: expected one of {list(config_lib.BACKENDS)}"
    )
