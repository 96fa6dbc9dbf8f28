"""Checkpoints: a thin layer over orbax's ``CheckpointManager``.

Layout of a workdir::

    <workdir>/config.json              the run's config plus the data sizes (``dataset`` key)
    <workdir>/checkpoints/<step>/...   orbax checkpoints (written to a temporary folder, then
                                       renamed: a killed run never leaves a partial step)

A state pytree (a dict, a ``flax.struct`` dataclass, optax states, ...) is stored in its flax
state-dict form; every non-empty top-level dict entry becomes its own orbax item (so
``params`` can be read without reading the optimizer state) and the remaining top-level
entries go to the item ``_leaves``. Typed PRNG keys are stored as their key data and wrapped
again on restore.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

CHECKPOINT_SUBDIR = "checkpoints"
CONFIG_FILE = "config.json"
_LEAVES = "_leaves"
_TEACHER_HINT = ("create one with `python -m dimo_jax.main --config=configs/digits.py "
                 "--workdir=<dir> --config.mode=teacher`")


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

  # ------------------------------------------------------------------ queries
  def latest_step(self) -> Optional[int]:
    self._manager.wait_until_finished()
    return self._manager.latest_step()

  def all_steps(self):
    self._manager.wait_until_finished()
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
    return bool(self._manager.save(step, args=args, force=True))

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
      self._manager.wait_until_finished()
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
          step, args=ocp.args.Composite(**{n: ocp.args.StandardRestore() for n in names}))
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
        typed, target_sd, restored_sd)
    return serialization.from_state_dict(target, restored_sd)

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
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


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to a local ``path`` through a temporary file and a rename: a reader never
  sees half a file, and an interrupted write leaves the old file (or none)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
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
    restored = ckpt.restore(step, items=wanted)
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
