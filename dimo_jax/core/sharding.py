"""Device mesh and shardings: the batch over ``('data', 'fsdp')``, parameters and optimizer
states over ``'fsdp'`` (each array split along its largest dimension that the fsdp size
divides; small or indivisible arrays stay replicated)."""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

pass

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A 2-D mesh ``('data', 'fsdp')``; ``data=-1`` takes every device that fsdp leaves."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the {n} available devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} must equal the {n} devices; "
                     "use --config.mesh.data=-1 to take every device")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(shape, fsdp: int, min_size: int) -> P:
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for axis in order:
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def fsdp_shardings(tree, mesh: Mesh, min_size: int = 2**14):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, _leaf_spec(np.shape(x), fsdp, min_size)), tree)


def check_batch(batch_size: int, mesh: Mesh, name: str = "batch_size"):
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"{name}={batch_size} must be a multiple of the {n} devices in the mesh")


_MULTI_PROCESS_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def is_multi_process_env(environ=None) -> bool:
  """True when the environment describes several JAX processes: a coordinator address,
  ``JAX_NUM_PROCESSES`` > 1, or a multi-host TPU pod (``TPU_WORKER_HOSTNAMES``)."""
  env = os.environ if environ is None else environ
  if any(env.get(v) for v in _MULTI_PROCESS_VARS):
    return True
  try:
    if int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
      return True
  except ValueError:
    pass
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1


def maybe_initialize_distributed(config=None, environ=None) -> bool:
  """``jax.distributed.initialize()`` for multi-process runs (the environment, or
  ``config.distributed``); returns whether it was called."""
  wanted = bool(config.get("distributed", False)) if config is not None and hasattr(config, "get") else False
  if not (wanted or is_multi_process_env(environ)):
    return False
  jax.distributed.initialize()
  logging.info("JAX distributed: process %d of %d.", jax.process_index(), jax.process_count())
  return True


def host_array(x) -> np.ndarray:
  """A numpy copy of a (possibly multi-host sharded) array, the same on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def global_batch(local, batch_shard):
  return jax.make_array_from_process_local_data(batch_shard, local)
