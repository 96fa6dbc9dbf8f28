"""Checkpoints: a thin layer over orbax's ``CheckpointManager``.

Layout of a workdir::

    <workdir>/config.json              the run's config plus the data sizes (``dataset`` key)
    <workdir>/run.lock                 the host and process of the run that holds it (``workdir_lock``)
    <workdir>/checkpoints/<step>/...   orbax checkpoints (written to a temporary folder, then
                                       renamed: a killed run never leaves a partial step)
    <workdir>/checkpoints/<step>.corrupt-<n>   an unreadable checkpoint moved aside on resume

A state pytree (a dict, a ``flax.struct`` dataclass, optax states, ...) is stored in its flax
state-dict form; every non-empty top-level dict entry becomes its own orbax item (so
``params`` can be read without reading the optimizer state) and the remaining top-level
entries go to the item ``_leaves``. Typed PRNG keys are stored as their key data and wrapped
again on restore.

Errors a user can act on (a workdir held by another run, an unreadable checkpoint, a full disk)
are ``UserError``s: the command line prints their message without a traceback.

The module is longer than the project's 500-line guide because one concept needs it: writing and
restoring a run's state, where the damaged-checkpoint fallback, the restore across device and
process counts and the atomic file writes all act on the same checkpoint folder (the workdir lock
lives in ``workdir_lock``).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"
_LEAVES = "_leaves"
_TEACHER_HINT = ("train a teacher with `python -m dimo_jax.main --config=<config> --workdir=<dir> "
                 "--config.mode=teacher`, or convert a published one with `python -m dimo_jax.convert`")


# ---------------------------------------------------------------------------- errors
class UserError(ValueError):
  """An error in what the user gave or in the files a run found (config, data, workdir,
  checkpoints, disk space): its message names the key, file or value and the fix, and the
  command line prints it without a traceback."""


class WorkdirInUse(UserError):
  """Another live run holds the workdir's lock."""


class CheckpointUnreadable(UserError):
  """No intact checkpoint to resume from or to load."""


class DiskFull(UserError):
  """A write failed with ENOSPC (or a quota); the message names the path and what was kept."""


def is_disk_full(err: BaseException) -> bool:
  """True when ``err`` (or an exception it was raised from) is a full disk or quota: an
  ``OSError`` with ENOSPC / EDQUOT, or TensorStore's "No space left on device"."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
      return True
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
      return True
    err = err.__cause__ or err.__context__
  return False


def short_reason(err: BaseException, limit: int = 160) -> str:
  """The first line of an exception's message, without TensorStore's spec, at most ``limit``
  characters."""
  text = str(err).strip().split("\n")[0] or type(err).__name__
  for cut in (" See full TensorStore details", " [tensorstore_spec=", " [source locations="):
    text = text.split(cut)[0]
  text = text.rstrip(". ")
  if len(text) > limit:
    text = text[: limit - 3] + "..."
  return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


def _is_typed_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _split_items(state_dict) -> dict:
  if not isinstance(state_dict, dict):
    return {_LEAVES: {"value": state_dict}}
  items, leaves = {}, {}
  for k, v in state_dict.items():
    if not isinstance(k, str) or not k or k.startswith("_") or "/" in k:
      raise ValueError(f"checkpoint state keys must be plain names, got {k!r}")
    if isinstance(v, dict) and v:
      items[k] = v
    else:
      leaves[k] = v
  if leaves:
    items[_LEAVES] = leaves
  return items


def _join_items(items: dict):
  items = dict(items)
  leaves = items.pop(_LEAVES, None) or {}
  if set(leaves) == {"value"} and not items:
    return leaves["value"]
  return {**items, **leaves}


def _restore_as_stored():
  """Restore arguments without a target. Arrays come back with the sharding they were saved
  with, or replicated over this run's devices when that sharding names devices this run lacks
  (a checkpoint written with another device or process count)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
  return ocp.args.StandardRestore(
      fallback_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _placed_like(ref, x):
  """``x`` left uncommitted where the target leaf ``ref`` was, in multi-process runs: a value each
  process holds alone (a step count or key made with ``jnp.zeros``) would come back pinned to one
  local device, which ``jax.device_put`` cannot then move onto shardings spanning other processes."""
  if (jax.process_count() > 1 and isinstance(ref, jax.Array) and not ref.committed
      and isinstance(x, jax.Array) and x.committed and x.is_fully_addressable):
    return jnp.asarray(np.asarray(x))
  return x


class Checkpointer:
  """Saves and restores state pytrees under ``directory`` (keeps the last ``max_to_keep``).

  ``save(step, state)`` writes when ``step % save_interval == 0`` (or ``force``); writes are
  asynchronous and atomic; ``restore``, ``latest_step`` and ``close`` wait for pending writes.
  """

  def __init__(self, directory, max_to_keep: Optional[int] = 2, save_interval: int = 1, *,
               async_save: bool = True, read_only: bool = False):
    if save_interval < 1:
      raise ValueError(f"save_interval must be >= 1, got {save_interval}")
    self.directory = abspath(directory)
    self.save_interval = int(save_interval)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None,
        create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._writing = None  # the step of the last save started
    self.accepted = []  # config changes accepted on resume (set by the loop)

  # ------------------------------------------------------------------ disk full
  def _finished(self):
    """Waits for pending writes; a full disk becomes one ``DiskFull`` message."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_disk_full(e)
      raise

  def _raise_if_disk_full(self, err: BaseException):
    if not is_disk_full(err):
      return
    step = self._writing
    where = os.path.join(self.directory, str(step)) if step is not None else self.directory
    kept = self.kept([s for s in self.step_folders() if s != step])
    raise DiskFull(f"no space left on device while writing {where}; {kept}. Free space (or use a "
                   "--workdir on a larger disk) and rerun the same command") from err

  def kept(self, steps=None) -> str:
    """What a stopped run leaves behind, in words (``steps``: default the finished step folders)."""
    steps = self.step_folders() if steps is None else list(steps)
    if not steps:
      return f"no complete checkpoint is kept in {self.directory}"
    if len(steps) == 1:
      return f"kept: the checkpoint at step {steps[0]} in {self.directory} (a rerun resumes from it)"
    return (f"kept: the checkpoints at steps {', '.join(map(str, steps))} in {self.directory} (a rerun "
            f"resumes from step {steps[-1]})")

  def step_folders(self):
    """Steps with a finished folder ``<directory>/<step>`` (read from the folder listing)."""
    d = epath.Path(self.directory)
    if not d.is_dir():
      return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> Optional[int]:
    self._finished()
    return self._manager.latest_step()

  def all_steps(self):
    self._finished()
    return list(self._manager.all_steps())

  def item_names(self, step: int):
    """Top-level entries stored at ``step`` (folder names of the orbax items)."""
    step_dir = os.path.join(self.directory, str(int(step)))
    if not os.path.isdir(step_dir):
      return []
    return sorted(n for n in os.listdir(step_dir)
                  if os.path.isdir(os.path.join(step_dir, n)) and not n.startswith(".")
                  and "orbax-checkpoint-tmp" not in n)

  # ------------------------------------------------------------------ save / restore
  def should_save(self, step: int, force: bool = False) -> bool:
    return bool(force or step % self.save_interval == 0)

  def save(self, step: int, state, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` if due. Returns whether a checkpoint was started."""
    step = int(step)
    if not self.should_save(step, force):
      return False
    if step in self._manager.all_steps():
      return False
    items = _split_items(_keys_to_data(serialization.to_state_dict(state)))
    args = ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
    try:
      self._finished()  # a failed earlier write reports here, naming its own step
      self._writing = step
      return bool(self._manager.save(step, args=args, force=True))
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_disk_full(e)
      raise

  def restore(self, step: Optional[int] = None, target=None, *, items=None):
    """Restores ``step`` (default: latest).

    With ``target`` the result has the target's structure, dtypes and shardings (typed PRNG
    keys included); without it, the stored state dict (nested dicts of arrays). ``items``
    limits a target-free restore to some top-level entries (e.g. ``('params',)``).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory!r}; {_TEACHER_HINT}")
    else:
      self._finished()
      if int(step) not in self._manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {self.directory!r} (steps: {self.all_steps()})")
    step = int(step)
    if target is None:
      names = self.item_names(step)
      if items is not None:
        missing = [n for n in items if n not in names]
        if missing:
          raise KeyError(f"checkpoint {self.directory!r} step {step} has no entries {missing}; "
                         f"it holds {[n for n in names if n != _LEAVES]}")
        names = list(items)
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{n: _restore_as_stored() for n in names}))
      return _join_items({n: restored[n] for n in names})

    target_sd = serialization.to_state_dict(target)
    typed = jax.tree_util.tree_map(_is_typed_key, target_sd)
    target_items = _split_items(_keys_to_data(target_sd))
    stored = set(self.item_names(step))
    if set(target_items) != stored:
      raise ValueError(
          f"checkpoint {self.directory!r} step {step} holds entries {sorted(stored)} but the target "
          f"has {sorted(target_items)}; it was written by another kind of run")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardRestore(v) for k, v in target_items.items()}))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"checkpoint {self.directory!r} step {step} does not match the target "
                       f"structure (different model or optimizer config?): {e}") from e
    restored_sd = _join_items({k: restored[k] for k in target_items})
    restored_sd = jax.tree_util.tree_map(
        lambda is_key, ref, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if is_key else x,
        typed, target_sd, jax.tree_util.tree_map(_placed_like, target_sd, restored_sd))
    return serialization.from_state_dict(target, restored_sd)

  # ------------------------------------------------------------------ resume past damage
  def unreadable_reason(self, step: int, target=None) -> Optional[str]:
    """Why ``step`` cannot be read (None when it reads: a failed restore into ``target`` was then
    a real structure mismatch). A step missing entries that ``target`` has is damaged too."""
    names = set(self.item_names(step))
    if target is not None:
      wanted = set(_split_items(_keys_to_data(serialization.to_state_dict(target))))
      if names < wanted:
        return f"entries {sorted(wanted - names)} are missing"
      if names != wanted:
        return None  # another kind of run: not damage
    if not names:
      return "the step folder holds no entries"
    try:
      self._manager.restore(int(step), args=ocp.args.Composite(
          **{n: _restore_as_stored() for n in sorted(names)}))
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, MemoryError) or "out of memory" in str(e).lower() or is_disk_full(e):
        return None  # the machine, not the checkpoint
      return short_reason(e)
    return None

  def move_aside(self, step: int) -> str:
    """Renames ``<directory>/<step>`` to ``<step>.corrupt-<n>`` (never deletes it); returns the
    new path. In a multi-process run every process calls it and process 0 renames."""
    src = epath.Path(self.directory) / str(int(step))
    n = 1
    while (epath.Path(self.directory) / f"{int(step)}.corrupt-{n}").exists():
      n += 1
    dst = epath.Path(self.directory) / f"{int(step)}.corrupt-{n}"
    error = None
    if jax.process_index() == 0:
      try:
        src.rename(dst)
      except OSError as e:
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if failed and error is None:
        error = OSError(f"process 0 could not rename it to {dst}")
      while jax.process_index() > 0 and n > 1 and not dst.exists():
        n -= 1  # process 0 may have renamed it before this process looked for a free name
        dst = epath.Path(self.directory) / f"{int(step)}.corrupt-{n}"
    if error is not None:
      raise CheckpointUnreadable(
          f"checkpoint step {step} in {self.directory} is unreadable and could not be moved aside "
          f"({short_reason(error)}); move {src} out of the folder by hand and rerun") from error
    self._manager.reload()
    return os.fspath(dst)

  def _restore_on_every_process(self, step: int, target):
    """``restore`` in a multi-process run: ``(state, None)`` when every process read ``step``,
    ``(None, reason)`` when one found it damaged (then all move it aside together); an error that
    is not damage is raised on every process, so that no process waits on the others alone."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    restored, error, reason = None, None, None
    try:
      restored = self.restore(step, target)
    except Exception as e:  # pylint: disable=broad-except
      error = e
      reason = self.unreadable_reason(step, target)
    code = 0 if error is None else (1 if reason is not None else 2)
    codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
    if not codes.any():
      return restored, None
    if (codes == 1).any():
      damaged = [i for i, c in enumerate(codes) if c == 1]
      return None, reason or f"unreadable on process {damaged[0]}"
    if error is not None:
      raise error
    failed = [i for i, c in enumerate(codes) if c]
    raise RuntimeError(f"checkpoint step {step} in {self.directory} could not be restored on process "
                       f"{failed[0]}; its log says why")

  def restore_latest(self, target):
    """``(step, state)`` from the newest intact checkpoint, ``(0, target)`` when there is none.

    An unreadable step (a truncated data file, emptied metadata, missing entries) is moved
    aside to ``<step>.corrupt-<n>`` with a one-line warning, and the next older step is tried;
    when steps existed but none was intact, ``CheckpointUnreadable`` names the folder."""
    moved = []
    for step in sorted(self.all_steps(), reverse=True):
      if jax.process_count() > 1:
        restored, reason = self._restore_on_every_process(step, target)
        if reason is None:
          return step, restored
      else:
        try:
          return step, self.restore(step, target)
        except Exception:  # pylint: disable=broad-except
          reason = self.unreadable_reason(step, target)
          if reason is None:
            raise
      path = self.move_aside(step)
      moved.append((step, path))
      logging.warning("Checkpoint step %d in %s is unreadable (%s); moved it to %s and trying the "
                      "next older one.", step, self.directory, reason, path)
    if moved:
      names = ", ".join(os.path.basename(p) for _, p in moved)
      raise CheckpointUnreadable(
          f"no intact checkpoint in {self.directory}: every step was unreadable and is moved aside "
          f"({names}); rerun to start again from step 0, or use another --workdir")
    return 0, target

  def wait(self):
    self._finished()

  def close(self):
    try:
      self._finished()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------- config beside checkpoints
def _json_default(obj):
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, (set, frozenset)):
    return sorted(obj)
  return str(obj)


def current_umask() -> int:
  """The process's file-creation mask (read from /proc where it can be, without changing it)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(path) -> None:
  """Gives ``path`` the mode a plain ``open(path, 'w')`` would (0o666 less the umask): files
  made with ``tempfile.mkstemp`` start at 0600."""
  os.chmod(path, 0o666 & ~current_umask())


def as_json(obj):
  """``obj`` as it reads back from ``config.json`` (tuples as lists, numpy scalars as numbers)."""
  return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to a local ``path`` through a temporary file and a rename: a reader never
  sees half a file, and an interrupted write leaves the old file (or none). The file gets the
  user's umask; a full disk raises ``DiskFull`` naming ``path``."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    apply_umask(tmp)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, Exception) and is_disk_full(e):
      raise DiskFull(f"no space left on device while writing {path}; the previous version (if any) is "
                     "kept. Free space and rerun the same command") from e
    raise


def is_remote(path) -> bool:
  """True for object-store paths such as ``gs://bucket/dir`` (handled through etils.epath)."""
  return "://" in os.fspath(path)


def abspath(path) -> str:
  """``os.path.abspath`` for local paths; remote paths are returned unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path) -> None:
  if is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def write_config(workdir, config_dict: dict, filename: str = CONFIG_FILE) -> str:
  """Writes ``config_dict`` as JSON to ``<workdir>/config.json`` atomically (temp file + rename)."""
  workdir = os.fspath(workdir)
  makedirs(workdir)
  path = os.path.join(workdir, filename)
  text = json.dumps(config_dict, indent=2, sort_keys=True, default=_json_default)
  if is_remote(workdir):  # object stores write whole objects: a reader never sees half a file
    epath.Path(path).write_text(text + "\n")
  else:
    atomic_write_bytes(path, (text + "\n").encode())
  return path


def read_config(workdir, filename: str = CONFIG_FILE) -> Optional[dict]:
  """The JSON config stored in ``workdir`` (or None if there is none)."""
  path = epath.Path(os.fspath(workdir)) / filename
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({e}); delete or fix it") from e


def checkpoint_dir(workdir) -> str:
  return os.path.join(abspath(workdir), CHECKPOINT_SUBDIR)


def _has_steps(directory: str) -> bool:
  d = epath.Path(directory)
  return d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir())


def resolve_checkpoint_dir(path) -> tuple[str, str]:
  """``(checkpoint folder, workdir)`` for a workdir or its ``checkpoints`` folder."""
  path = abspath(path)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist; {_TEACHER_HINT}")
  if _has_steps(os.path.join(path, CHECKPOINT_SUBDIR)):
    return os.path.join(path, CHECKPOINT_SUBDIR), path
  if _has_steps(path):
    return path, (os.path.dirname(path) if os.path.basename(path) == CHECKPOINT_SUBDIR else path)
  raise FileNotFoundError(
      f"no checkpoint found in {path!r} (looked for {os.path.join(path, CHECKPOINT_SUBDIR)!r}/<step>); "
      f"{_TEACHER_HINT}")


def load_params(path, step: Optional[int] = None):
  """Reads a workdir's latest (or ``step``) checkpoint without a target.

  Returns ``(params, ema_params, config)``: ``ema_params`` is None when the checkpoint has
  none, ``config`` the dict from ``config.json`` beside the checkpoints (None if absent).
  """
  ckpt_dir, workdir = resolve_checkpoint_dir(path)
  ckpt = Checkpointer(ckpt_dir, max_to_keep=None, async_save=False, read_only=True)
  try:
    if step is None:
      step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir!r}; {_TEACHER_HINT}")
    names = ckpt.item_names(step)
    if "params" not in names:
      raise ValueError(f"checkpoint {ckpt_dir!r} step {step} has no 'params' entry (has {names})")
    wanted = ["params"] + (["ema_params"] if "ema_params" in names else [])
    try:
      restored = ckpt.restore(step, items=wanted)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        raise
      raise CheckpointUnreadable(f"checkpoint step {step} in {ckpt_dir} is unreadable ({short_reason(e)}); "
                                 "rewrite it (rerun the run or the converter that made it)") from e
  finally:
    ckpt.close()
  config = read_config(workdir)
  if config is None and os.path.basename(ckpt_dir) != CHECKPOINT_SUBDIR:
    config = read_config(os.path.dirname(ckpt_dir))
  return restored["params"], restored.get("ema_params"), config


def save_params(workdir, params, config_dict: Optional[dict] = None, *, ema_params=None,
                step: int = 0) -> str:
  """Writes a params-only checkpoint (e.g. converted weights) readable by ``load_params``."""
  state = {"params": params}
  if ema_params is not None:
    state["ema_params"] = ema_params
  with Checkpointer(checkpoint_dir(workdir), max_to_keep=None, async_save=False) as ckpt:
    ckpt.save(step, state, force=True)
  if config_dict is not None and jax.process_index() == 0:
    write_config(workdir, config_dict)
  return os.fspath(workdir)
