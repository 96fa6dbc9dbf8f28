"""Device mesh and shardings: the batch over ``('data', 'fsdp')``, parameters and optimizer
states over ``'fsdp'`` (each array split along its largest dimension that the fsdp size
divides; small or indivisible arrays stay replicated)."""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
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


def is_multihost_env() -> bool:
  """True when the environment describes several JAX processes (coordinator or TPU pod)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize_distributed(force: Optional[bool] = None) -> bool:
  """Calls ``jax.distributed.initialize()`` on multi-host runs (once); returns whether it did."""
  if force is False or (force is None and not is_multihost_env()):
    return False
  jax.distributed.initialize()
  return True
