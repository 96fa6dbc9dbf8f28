"""Checks a run makes before it writes or loads much: that a folder can be written, that its disk
has room for what will be written, and that memory holds what will be loaded. Each failure is one
``UserError`` line naming the folder or file, the bytes needed and the bytes there."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from dimo_jax.storage.checkpoints import UserError, is_remote

# Room kept beyond the estimate (orbax writes temporary copies and metadata beside the arrays).
CHECKPOINT_OVERHEAD = 1.1
CHECKPOINT_SLACK_BYTES = 16 * 2**20


def human_bytes(n: float) -> str:
  """``n`` bytes as ``"1.5 GiB"``."""
  n = float(n)
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def _existing_parent(path: str) -> str:
  """``path`` or its nearest existing parent (a folder the run will create is checked there)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_writable(path, what: str = "the output folder") -> None:
  """Raises ``UserError`` unless files can be created in the folder ``path`` (or, when it does not
  exist yet, in its nearest existing parent). A probe file is made and removed: permission bits
  alone mislead on read-only mounts and for root. Object-store paths (``gs://``) are not probed."""
  path = os.fspath(path)
  if is_remote(path):
    return
  target = _existing_parent(path)
  if not os.path.isdir(target):
    raise UserError(f"{what} {path}: {target} is a file, not a folder; pass a folder")
  try:
    fd, probe = tempfile.mkstemp(dir=target, prefix=".write_probe_")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise UserError(f"{what} {path}: cannot write in {target} ({e.strerror or e}); pick a folder you can "
                    "write to, or change its permissions") from None


def check_free_space(path, need_bytes: int, what: str = "the output") -> None:
  """Raises ``UserError`` when the disk holding ``path`` (or its nearest existing parent) has less
  than ``need_bytes`` free, naming the folder, the bytes needed and the bytes free."""
  path = os.fspath(path)
  if is_remote(path) or need_bytes <= 0:
    return
  target = _existing_parent(path)
  free = shutil.disk_usage(target).free
  if free < need_bytes:
    raise UserError(f"{what} needs {human_bytes(need_bytes)} in {target} but only {human_bytes(free)} is "
                    "free; free some space or pass a folder on a larger disk")


def checkpoint_bytes(params: Any, copies: int = 1) -> int:
  """Bytes a checkpoint of the pytree ``params`` (arrays, ``jax.ShapeDtypeStruct`` or anything with
  ``shape`` and ``dtype``) takes on disk: ``copies`` trees (e.g. 2 for params and EMA, 4 with
  Adam's two moments) with ``CHECKPOINT_OVERHEAD`` and ``CHECKPOINT_SLACK_BYTES`` on top."""
  import jax  # pylint: disable=import-outside-toplevel

  total = 0
  for leaf in jax.tree_util.tree_leaves(params):
    shape, dtype = getattr(leaf, "shape", np.shape(leaf)), getattr(leaf, "dtype", None)
    itemsize = np.dtype(dtype).itemsize if dtype is not None else np.asarray(leaf).dtype.itemsize
    total += int(np.prod(shape, dtype=np.int64)) * itemsize
  return int(total * copies * CHECKPOINT_OVERHEAD) + CHECKPOINT_SLACK_BYTES


def available_memory() -> Optional[int]:
  """Bytes of memory available to this process (``MemAvailable`` of ``/proc/meminfo``, bounded by
  a cgroup limit when one is set), or None where it cannot be read."""
  found = None
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          found = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      with open(limit_file, encoding="ascii") as f:
        limit = f.read().strip()
      with open(usage_file, encoding="ascii") as f:
        usage = int(f.read().strip())
    except (OSError, ValueError):
      continue
    if limit.isdigit() and int(limit) < 2**60:
      room = max(0, int(limit) - usage)
      found = room if found is None else min(found, room)
    break
  return found


def check_free_memory(need_bytes: int, what: str, fix: str) -> None:
  """Raises ``UserError`` when ``need_bytes`` exceed ``available_memory()`` (nothing when it is
  unknown), naming ``what``, both sizes and ``fix``."""
  free = available_memory()
  if free is not None and need_bytes > free:
    raise UserError(f"{what} needs {human_bytes(need_bytes)} of memory but {human_bytes(free)} is "
                    f"available; {fix}")


def check_write_targets(targets) -> None:
  """The check a run makes in its first second, before any compute: every ``(folder, need_bytes,
  what)`` of ``targets`` writable (``check_writable``), and each disk's free space above the sum of
  the bytes that go to it (``check_free_space`` with all the targets on that disk named).
  Object-store folders are skipped. Raises ``UserError`` (one line) on the first failure."""
  disks = {}
  for folder, need, what in targets:
    folder = os.fspath(folder)
    check_writable(folder, what)
    if is_remote(folder) or int(need or 0) <= 0:
      continue
    device = os.stat(_existing_parent(folder)).st_dev
    total, names, first = disks.get(device, (0, [], folder))
    disks[device] = (total + int(need), names + [what], first)
  for total, names, folder in disks.values():
    check_free_space(folder, total, " and ".join(names))
