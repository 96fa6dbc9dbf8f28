"""Device mesh and shardings: the batch over ``('data', 'fsdp')``, parameters and optimizer
states over ``'fsdp'`` (each array split along its largest dimension that the fsdp size
divides; small or indivisible arrays stay replicated)."""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def _env_int(env, name: str) -> Optional[int]:
  value = (env.get(name) or "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"the environment variable {name}={value!r} must be an integer") from None


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


def distributed_args(environ=None) -> dict:
  """The arguments of ``jax.distributed.initialize`` that the environment names.

  JAX reads ``JAX_COORDINATOR_ADDRESS`` itself but not the process count and index: those come
  from ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` here (``COORDINATOR_ADDRESS`` is accepted
  for the address). What is left out, JAX detects on the platforms it knows (Cloud TPU slices,
  SLURM, Open MPI, Kubernetes); elsewhere (several GPU nodes or CPU processes started by hand)
  all three variables must be set.
  """
  env = os.environ if environ is None else environ
  args = {}
  address = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
  if address:
    args["coordinator_address"] = address
  num, index = _env_int(env, "JAX_NUM_PROCESSES"), _env_int(env, "JAX_PROCESS_ID")
  if num is not None:
    if num < 1:
      raise ValueError(f"JAX_NUM_PROCESSES={num} must be >= 1")
    args["num_processes"] = num
  if index is not None:
    if index < 0 or (num is not None and index >= num):
      raise ValueError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={num})")
    args["process_id"] = index
  return args


def maybe_initialize_distributed(config=None, environ=None) -> bool:
  """``jax.distributed.initialize`` for multi-process runs (the environment, or
  ``config.distributed``), with the arguments of ``distributed_args``; returns whether the
  multi-process runtime is up (a second call, e.g. a mode calling another, does nothing)."""
  wanted = bool(config.get("distributed", False)) if config is not None and hasattr(config, "get") else False
  if not (wanted or is_multi_process_env(environ)):
    return False
  if jax.distributed.is_initialized():
    return True
  args = distributed_args(environ)
  call = f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in args.items())})"
  try:
    jax.distributed.initialize(**args)
  except ValueError as e:
    raise ValueError(
        f"{call} failed: {e}. Outside Cloud TPU, SLURM, Open MPI and Kubernetes set "
        "JAX_COORDINATOR_ADDRESS=<host of process 0>:<port>, JAX_NUM_PROCESSES and JAX_PROCESS_ID on "
        "every process (experiments/tpu/README.md, 'Multi-host and multi-node')") from e
  except RuntimeError as e:
    if "before any JAX" not in str(e):
      raise
    raise RuntimeError(
        f"{call} came after JAX had started on this process alone (something, e.g. a config file, "
        "asked for the devices first); call dimo_jax.core.sharding.maybe_initialize_distributed() "
        "before that") from e
  logging.info("JAX distributed: process %d of %d, %d of %d devices local.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def host_array(x) -> np.ndarray:
  """A numpy copy of a (possibly multi-host sharded) array, the same on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def host_tree(tree):
  """``host_array`` of every array of a pytree: numpy copies, gathered from the other processes
  where an array is split over them (``jax.device_get`` refuses such arrays)."""
  return jax.tree_util.tree_map(host_array, tree)


def global_batch(local, batch_shard):
  return jax.make_array_from_process_local_data(batch_shard, local)
