"""Loop plumbing shared by the modes: metric writers and progress (clu, which brings TensorFlow, is
imported inside the functions that use it), the workdir setup and its lock, the check that a
resumed run has the config it started with, checkpoints restored past damaged steps, the stop
on non-finite steps, preemption, sample grids, and the entry every mode's ``run`` goes through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core import sharding
from dimo_jax.families import base as families
from dimo_jax.families.classes import save_grid  # noqa: F401 (modes.sample writes its grids with it)
from dimo_jax.storage import checkpoints, preflight, workdir_lock as run_lock
from dimo_jax.storage.checkpoints import UserError

PREEMPTED = "preempted"  # key of a loop's result: True when SIGTERM stopped it


class NonFiniteStop(UserError, FloatingPointError):
  """A run stopped on non-finite values (its message says where and what to change)."""


# ---------------------------------------------------------------------------- writers / progress
def create_writer(workdir: str, *, just_logging: Optional[bool] = None):
  """clu writer: TensorBoard events in ``workdir`` and the log (process 0 only writes events)."""
  from clu import metric_writers  # pylint: disable=import-outside-toplevel (imports TensorFlow)
  if just_logging is None:
    just_logging = jax.process_index() > 0
  return metric_writers.create_default_writer(workdir, just_logging=just_logging)


def create_progress(num_steps: int, writer=None, every_steps: Optional[int] = None):
  """clu ``ReportProgress``: steps/s and ETA written to ``writer`` and the log."""
  from clu import periodic_actions  # pylint: disable=import-outside-toplevel
  return periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                         every_steps=every_steps, every_secs=None if every_steps else 60.0)


def log_window(history: list, step: int, writer, prefix: str = "", *, stop_on_nonfinite: bool = True,
               name: str = "train") -> dict:
  """Writes the mean of the metrics gathered since the last call (and empties ``history``).

  A non-finite mean stops the run (``NonFiniteStop``) when ``stop_on_nonfinite``; otherwise (a
  loop whose step guards itself and stops through ``NonFiniteWatch``) it is written and warned
  about in one line."""
  summary = mean_metrics(history)
  history.clear()
  bad = {k: v for k, v in summary.items() if not math.isfinite(v)}
  if bad and stop_on_nonfinite:
    raise NonFiniteStop(
        f"{name}: non-finite metrics at step {step} ({_fmt(bad)}): the run diverged. Lower "
        f"--config.{name}.lr (or raise --config.{name}.warmup_steps) and resume with "
        f"--config.resume_accept={name}.lr, or start in a new --workdir")
  writer.write_scalars(step, {prefix + k: v for k, v in summary.items()})
  counts = {k: v for k, v in summary.items() if _counts_nonfinite(k) and v > 0}
  if bad or counts:
    what = "; ".join(x for x in (f"non-finite metrics {_fmt(bad)}" if bad else "",
                                 f"non-finite values zeroed per step {_fmt(counts)}" if counts else "") if x)
    logging.warning("Step %d: %s. The run goes on (the step zeroes non-finite gradients) and stops after "
                    "config.%s.max_nonfinite_steps consecutive steps with any.", step, what, name)
  return summary


def _fmt(values: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))


def _counts_nonfinite(key: str) -> bool:
  """Metrics that count non-finite values of a step (``gen/nan_count``, ``gen/nonfinite``)."""
  leaf = key.rsplit("/", 1)[-1]
  return leaf.endswith("nan_count") or leaf.endswith("nonfinite")


class NonFiniteWatch:
  """Stops a loop after ``limit`` consecutive steps with non-finite gradients (0: never).

  A step counts when one of its counting metrics (``*nan_count``, ``*nonfinite``) is positive or
  a ``*grad_norm`` is not finite. ``update`` looks at the previous step's metrics (already
  computed while the current step runs, so the loop does not wait on the device); ``flush`` at
  the last one."""

  def __init__(self, limit: int, name: str = "distill", ckpt=None):
    self.limit = int(limit or 0)
    self.name = name
    self.ckpt = ckpt
    self.streak = 0
    self.first = None
    self._pending = None

  @staticmethod
  def nonfinite(metrics: dict) -> bool:
    keys = [k for k in metrics if _counts_nonfinite(k) or k.rsplit("/", 1)[-1] == "grad_norm"]
    values = jax.device_get({k: metrics[k] for k in keys})
    for k, v in values.items():
      v = np.asarray(v, np.float64)
      if _counts_nonfinite(k) and (np.any(v > 0) or not np.all(np.isfinite(v))):
        return True
      if not _counts_nonfinite(k) and not np.all(np.isfinite(v)):
        return True
    return False

  def update(self, step: int, metrics: dict):
    pending, self._pending = self._pending, (step, metrics)
    if pending is not None:
      self._check(*pending)

  def flush(self):
    pending, self._pending = self._pending, None
    if pending is not None:
      self._check(*pending)

  def _check(self, step: int, metrics: dict):
    if not self.nonfinite(metrics):
      self.streak, self.first = 0, None
      return
    self.streak += 1
    self.first = step if self.first is None else self.first
    if self.limit > 0 and self.streak >= self.limit:
      if self.ckpt is not None:
        self.ckpt.wait()
      kept = self.ckpt.kept() if self.ckpt is not None else "no checkpoint is kept"
      raise NonFiniteStop(
          f"{self.name}: {self.streak} consecutive steps ({self.first} to {step}) had non-finite gradients "
          f"(config.{self.name}.max_nonfinite_steps={self.limit}); stopped, {kept}. Check the teacher "
          f"for non-finite values, lower --config.{self.name}.gen_lr, or raise "
          f"--config.{self.name}.max_nonfinite_steps (0 never stops)")


def mean_metrics(history):
  """Mean of a list of metric dicts (device arrays), fetched once."""
  if not history:
    return {}
  stacked = jax.device_get(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}


# ---------------------------------------------------------------------------- loop setup
def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` (a local folder or an object-store path); a file, or a folder that
  cannot be created or written, is a one-line ``UserError``. Returns its absolute path."""
  workdir = checkpoints.abspath(workdir)
  if checkpoints.is_remote(workdir):
    checkpoints.makedirs(workdir)
    return workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a folder; pass a folder (it is created when missing)")
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    blocker = workdir
    while blocker != os.path.dirname(blocker) and not os.path.exists(blocker):
      blocker = os.path.dirname(blocker)
    raise UserError(f"--workdir={workdir} cannot be created: {blocker} is a file; pass a folder path") from e
  except OSError as e:
    raise UserError(f"--workdir={workdir} cannot be created ({e.strerror}); choose a folder you can write") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir} is not writable; choose a folder you can write (or fix its permissions)")
  preflight.check_writable(workdir, "--workdir")  # a probe file: permission bits mislead for root and read-only mounts
  return workdir


def checkpoint_need(state_shapes, section, workdir: str) -> int:
  """Bytes the checkpoints of a run write into ``<workdir>/checkpoints``: one per kept step
  (``keep_checkpoints``, plus the one written before the oldest is removed) less those already
  there, each ``preflight.checkpoint_bytes`` of the state's shapes."""
  keep = int(section.get("keep_checkpoints", 3) or 3)
  folder = checkpoints.checkpoint_dir(workdir)
  have = len([n for n in os.listdir(folder) if n.isdigit()]) if os.path.isdir(folder) else 0
  return preflight.checkpoint_bytes(state_shapes) * max(1, keep + 1 - have)


def loop_setup(section, name: str, workdir: str, stop_after: Optional[int]):
  """Checks the common loop fields of ``config.<name>`` and the workdir; returns (steps,
  stop_after, workdir)."""
  if not workdir:
    raise ValueError(f"config.{name}: the run needs a workdir (--workdir=<dir>)")
  steps = int(section.steps)
  if steps < 1:
    raise ValueError(f"config.{name}.steps must be >= 1, got {steps}")
  if stop_after is None:
    stop_after = int(section.get("stop_after", 0) or 0) or None
  return steps, stop_after, check_workdir(workdir)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``<workdir>/run.lock`` (``storage.workdir_lock.WorkdirLock``) for the body: a second run on the
  same workdir stops at once with ``WorkdirInUse``. Process 0 holds it for all processes; after a
  body that finished normally, every process waits until process 0 has released it, so that what a
  process does next (``mode=evaluate`` at the end of a distillation checks the lock) never finds its
  own run's lock still held."""
  lock = run_lock.WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except PermissionError as e:
      error = UserError(f"--workdir={workdir} is not writable ({e.strerror}); choose a folder you can write")
    except OSError as e:
      if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise
      error = UserError(f"--workdir={workdir} is not writable ({e.strerror}); choose a folder you can write")
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = checkpoints.WorkdirInUse(f"process 0 could not lock {workdir}; its log says why")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if jax.process_index() == 0:
      lock.release()
  if jax.process_count() > 1:  # not after an error: a process that died would leave the others waiting
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"released {workdir}")


def check_stored_run(path: str, reader: str, *, generator: bool = True) -> None:
  """Stops a reader of a stored run (``reader``: the mode, for the message) before it loads
  anything, with one ``UserError`` line saying which: another live run holds ``path``'s lock
  (``WorkdirInUse``), or, with ``generator``, ``path`` holds a distillation's checkpoints but
  no ``generator/`` yet (an unfinished run). A folder whose ``config.json`` says it holds a
  generator or a teacher, and a missing path, pass (the loaders name what they hold or lack)."""
  path = os.fspath(path)
  if not path or checkpoints.is_remote(path) or not os.path.isdir(path):
    return
  lock = run_lock.WorkdirLock(path)
  record = lock.read()
  mine = lock.path in run_lock._HELD  # pylint: disable=protected-access  (this process's own run)
  if record is not None and not mine and lock.stale_reason(record) is None:
    raise checkpoints.WorkdirInUse(
        f"workdir {lock.workdir} is held by a running job (host {record.get('host', '?')}, pid "
        f"{record.get('pid', '?')}, {run_lock.LOCK_FILE}): {reader} it once that run has finished")
  if not generator:
    return
  from dimo_jax.storage import loaders  # pylint: disable=import-outside-toplevel
  ckpt_dir = checkpoints.checkpoint_dir(path)
  stored = checkpoints.read_config(path) or {}
  kind = stored.get("role") or stored.get("mode")  # a generator or a teacher is the loaders' to judge
  if (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and not os.path.isdir(loaders.generator_dir(path))
      and kind in (None, "distill") and "converted" not in stored):
    raise UserError(
        f"the run in {lock.workdir} is unfinished (checkpoints in {ckpt_dir}, no generator/ yet): resume it "
        f"with --config.mode=distill, or {reader} a finished generator")


# Config entries that never change what a run computes (logging, checkpoint and sample cadence,
# rematerialisation, where a converter's input was), left out of the resume check.
_CADENCE = ("log_every", "checkpoint_every", "sample_every", "keep_checkpoints", "stop_after", "eval_every",
            "eval_batch_size", "evaluate_at_end", "max_nonfinite_steps")
_NOT_COMPARED = ("model.remat", "model.attention_impl", "teacher.source", "data.tfds_data_dir", "meissonic.source",
                 "meissonic.remat", "meissonic.attention_impl")
# What each mode's run computes from (``meissonic``: the converted networks a Meissonic run distils).
_COMPARED = {"train": ("family", "mode", "seed", "data", "model", "train", "dataset"),
             "distill": ("family", "mode", "seed", "model", "teacher", "distill", "dataset", "meissonic")}
_PATHS = ("teacher.checkpoint", "data.path", "data.labels", "meissonic.transformer", "meissonic.vqvae",
          "meissonic.text_encoder", "meissonic.tokenizer")


def _flatten(tree, prefix=""):
  out = {}
  for k, v in (tree or {}).items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _same(key: str, old, new) -> bool:
  if old == new:
    return True
  if key in _PATHS and isinstance(old, str) and isinstance(new, str) and old and new:
    return not checkpoints.is_remote(old) and os.path.abspath(old) == os.path.abspath(new)
  return False


def parse_accept(spec) -> set:
  """``config.resume_accept``: a comma list of accepted keys (``distill.steps``, or a leaf name
  such as ``steps``, or a section such as ``distill``)."""
  if isinstance(spec, (list, tuple)):
    spec = ",".join(map(str, spec))
  return {a.strip() for a in str(spec or "").split(",") if a.strip()}


def config_differences(stored: dict, run_config: dict, name: str) -> list:
  """``[(key, stored value, new value)]`` for every compared entry that differs (entries that
  only one side has are not compared: configs gain fields)."""
  sections = _COMPARED[name]
  old, new = _flatten(stored), _flatten(checkpoints.as_json(run_config))
  diffs = []
  for key in sorted(set(old) & set(new)):
    if key.split(".")[0] not in sections or key in _NOT_COMPARED or key.rsplit(".", 1)[-1] in _CADENCE:
      continue
    if not _same(key, old[key], new[key]):
      diffs.append((key, old[key], new[key]))
  return diffs


def check_resume(workdir: str, run_config: dict, name: str, accept=()) -> list:
  """Compares ``run_config`` with the ``config.json`` a run left in ``workdir``.

  A difference in what the run computes (a teacher, the architecture, the data, a step
  setting, the step count) stops with ``UserError`` listing them, unless ``accept``
  (``config.resume_accept``) names each; returns the accepted differences' keys."""
  stored = checkpoints.read_config(workdir)
  if not stored:
    return []
  accept = parse_accept(accept)
  diffs = config_differences(stored, run_config, name)
  if not diffs:
    return []
  accepted = lambda k: k in accept or k.rsplit(".", 1)[-1] in accept or k.split(".")[0] in accept
  refused = [d for d in diffs if not accepted(d[0])]
  listing = lambda ds: "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in ds)
  if refused:
    raise UserError(
        f"--workdir={workdir} holds a {stored.get('mode', name)} run with another config, and resuming would mix "
        f"the two: {listing(refused)}.\nUse a new --workdir, or accept the changes with "
        f"--config.resume_accept={','.join(k for k, _, _ in refused)}")
  logging.warning("Resuming %s with accepted config changes: %s.", workdir, listing(diffs))
  return [k for k, _, _ in diffs]


def make_checkpointer(section, name: str, workdir: str, steps: int, run_config: Optional[dict] = None,
                      accept=()):
  """The loop's Checkpointer and the step its latest checkpoint holds (or 0). With
  ``run_config`` a workdir that holds checkpoints is first checked with ``check_resume``;
  ``ckpt.accepted`` lists the accepted differences."""
  every = int(section.get("checkpoint_every", 0) or 0)
  ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(workdir),
                                  max_to_keep=int(section.get("keep_checkpoints", 2)),
                                  save_interval=every if every > 0 else steps)
  try:
    start = ckpt.latest_step() or 0
    ckpt.accepted = check_resume(workdir, run_config, name, accept) if (start and run_config) else []
    if start > steps:
      raise UserError(f"{ckpt.directory} holds a checkpoint at step {start}, beyond config.{name}.steps={steps}; "
                      f"use another --workdir or raise --config.{name}.steps")
  except BaseException:
    ckpt.close()
    raise
  return ckpt, start


def restore(ckpt, state, name: str):
  """``(state, step)`` from the newest intact checkpoint (``Checkpointer.restore_latest``: a
  damaged one is moved aside with a warning); ``(state, 0)`` when there is none."""
  step, restored = ckpt.restore_latest(state)
  if step:
    logging.info("Resumed %s from %s at step %d.", name, ckpt.directory, step)
  return restored, int(step)


def refuse_model_flags(mode: str, keys: Iterable[str], compute_fields: Iterable[str] = ()):
  """In the modes that rebuild their networks from a stored ``config.json`` (``distill``,
  ``sample``, ``evaluate``) only the family's compute fields of ``config.model``
  (``Family.compute_fields``) apply; any other ``--config.model.<field>`` given on the command
  line is refused, not ignored."""
  if mode == "teacher":
    return
  fields = tuple(compute_fields)
  refused = sorted({k for k in keys if k.startswith("model.") and k.split(".", 1)[1] not in fields})
  if refused:
    allowed = f"only {', '.join('model.' + f for f in fields)} apply" if fields else "no model field applies"
    raise UserError(
        f"{', '.join('--config.' + k for k in refused)} cannot apply in mode={mode}: the networks are rebuilt "
        f"from the stored config.json of the teacher or generator. Drop the flag; {allowed} in this mode")


# ---------------------------------------------------------------------------- preemption
class PreemptionGuard:
  """Turns SIGTERM (a preempted TPU VM or a killed job) into a flag the loop checks: the loop
  then writes a final checkpoint and returns, and a rerun resumes from it."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: writing a checkpoint and stopping.")
    self.requested = True

  def __enter__(self):
    import signal  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    import signal  # pylint: disable=import-outside-toplevel
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def entry(fn: Callable) -> Callable:
  """A mode's ``run(config, workdir)``: joins the multi-process runtime when the environment (or
  ``config.distributed``) asks for it, then runs ``fn``."""
  def run(config, workdir: str):
    sharding.maybe_initialize_distributed(config)
    return fn(config, workdir)
  run.__doc__ = fn.__doc__
  return run



def check_flags(config, mode: str, given: Iterable[str]):
  """``refuse_model_flags`` with the compute fields of ``config.family``."""
  if mode != "teacher" and any(k.startswith("model.") for k in given):
    refuse_model_flags(mode, given, families.get_family(config).compute_fields)


# ---------------------------------------------------------------------------- the teacher loop
EARLY_STOP_FILE = "early_stop.json"  # written when the validation loss stopped the run


def train_teacher(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """``mode=teacher`` for every family: trains ``config.family``'s teacher (``Family.teacher_run``)
  with checkpoints in ``<workdir>/checkpoints`` and the config in ``config.json``.

  Resumes from the latest intact checkpoint (after ``check_resume``); each step's randomness and
  batch are pure functions of the step, so an interrupted run ends with the parameters of an
  uninterrupted one. The workdir is locked for the run; SIGTERM writes a checkpoint and returns
  ``preempted``. ``stop_after`` (or ``config.train.stop_after``) ends the loop after that many
  steps without a final checkpoint, as if the run were killed. With ``validate`` (the classes)
  the validation loss of the EMA parameters is logged every ``config.train.eval_every`` steps and
  ``config.train.patience`` evaluations without a relative gain of ``min_delta`` stop the run
  with the best EMA parameters (or, with ``config.train.plateau_window``, ``method.mdm.Plateau``'s
  rule on the noise of the validation loss). The family's ``sized_teacher_config`` first fills the
  model sizes and step count left at 0 from its data and ``config.train.budget``. Returns
  ``step``, ``train_loss`` (mean of the last logging window), the validation metrics at the end,
  ``val_loss_initial`` and ``preempted``."""
  family = families.get_family(config)
  config = family.sized_teacher_config(config)
  steps, stop_after, workdir = loop_setup(config.train, "train", workdir, stop_after)
  with workdir_lock(workdir):
    return _teacher_loop(config, workdir, family, steps, stop_after)


def _teacher_loop(config, workdir: str, family, steps: int, stop_after: Optional[int]) -> dict:
  from dimo_jax.method.mdm import Plateau  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  tc = config.train
  mesh = sharding.make_mesh(*family.mesh_axes(config))
  run = family.teacher_run(config, workdir, mesh)
  if run.finished():
    logging.info("The teacher in %s is finished; nothing to train.", workdir)
    return {"step": steps, PREEMPTED: False}
  shapes = jax.eval_shape(run.fns.init, jnp.int32(int(config.seed)))
  preflight.check_write_targets([(workdir, checkpoint_need(shapes, tc, workdir), "the teacher's checkpoints")])
  ckpt, start = make_checkpointer(tc, "train", workdir, steps, run.run_config, config.get("resume_accept", ""))
  writer = None
  proc = jax.process_index()
  try:
    state = run.fns.init(jnp.int32(int(config.seed)))
    if start:
      state, start = restore(ckpt, state, "the teacher")
    batches = run.batches(start)
    if proc == 0:
      checkpoints.write_config(workdir, run.run_config)
    writer = create_writer(workdir)
    log_every = max(int(tc.get("log_every", 100)), 1)
    eval_every = int(tc.get("eval_every", 0) or 0) if run.validate else 0
    sample_every = int(tc.get("sample_every", 0) or 0) if run.samples else 0
    progress = create_progress(steps, writer, every_steps=log_every)
    logging.info("Teacher (%s): %s, %d parameters, %d steps at batch %d.", family.name, run.describe,
                 int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))), steps, int(tc.batch_size))

    def validate():
      val = dict(run.validate(state))
      batches = val.pop("val_batches", None)  # per-batch losses: the plateau rule's paired noise
      writer.write_scalars(step, {f"val/{k[4:]}": v for k, v in val.items()})
      return dict(val, batches=batches) if batches is not None else val

    def write_samples():
      path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
      run.samples(state, step, path)
      if proc == 0:
        logging.info("Wrote %s", path)

    # Early stopping (config.train.plateau_window > 0: the noise rule; else patience > 0): the best
    # EMA parameters are kept and saved as the final checkpoint; a marker file keeps a rerun from
    # training past them.
    plateau = Plateau(int(tc.get("patience", 0) or 0), float(tc.get("min_delta", 1e-3) or 0.0),
                      window=int(tc.get("plateau_window", 0) or 0), k=float(tc.get("plateau_k", 2.0)))
    marker = os.path.join(workdir, EARLY_STOP_FILE)
    stopped = bool(start and os.path.exists(marker))
    best_ema = None
    final = {"step": start, "train_loss": float("nan"), PREEMPTED: False}
    history, step, t0 = [], start, time.time()
    if start == 0 and eval_every:
      final["val_loss_initial"] = validate()["val_loss"]
    with PreemptionGuard() as guard:
      while step < steps and not stopped:
        state, metrics = run.fns.step(state, *next(batches))
        step += 1
        history.append(metrics)
        progress(step)
        if step % log_every == 0 or step == steps:
          final["train_loss"] = log_window(history, step, writer, "train/")["loss"]
        ckpt.save(step, state, force=step == steps or guard.requested)
        if eval_every and step % eval_every == 0 and step != steps:
          val = validate()
          if plateau.update(step, val["val_loss"], val.get("val_loss_se", 0.0), val.get("batches")) and (
              plateau.patience or plateau.window):
            best_ema = jax.device_get(state.ema_params)
          if plateau.stop and best_ema is not None:
            logging.info("%s (best %.5f at step %d): stopping at step %d with the best EMA parameters.",
                         plateau.reason().capitalize(), plateau.best, plateau.best_step, step)
            state = state.replace(ema_params=jax.tree_util.tree_map(
                lambda b, a: jax.device_put(b, a.sharding), best_ema, state.ema_params))
            stopped = True
            if proc == 0:
              checkpoints.write_config(workdir, {"step": step, "best_step": plateau.best_step,
                                                 "best_val_loss": plateau.best}, filename=EARLY_STOP_FILE)
            break
        if sample_every and step % sample_every == 0:
          write_samples()
        if guard.requested or (stop_after and step >= stop_after and step < steps):
          logging.info("Stopping at step %d.", step)
          break
      final[PREEMPTED] = guard.requested and step < steps
    final["step"] = step
    if stopped:
      final["early_stop"] = True
    if step == steps or stopped:
      ckpt.save(step, state, force=True)
      ckpt.wait()
      if run.validate:
        final.update({k: v for k, v in validate().items() if k != "batches"})
      if run.finish:
        final.update(run.finish(state, step, final))
      if sample_every and step % sample_every:
        write_samples()
    writer.flush()
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  logging.info("Teacher training finished at step %d after %.1fs: %s", step, time.time() - t0, final)
  return final


# ---------------------------------------------------------------------------- the distillation loop
def train_distill(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """``mode=distill`` for every family: Di[M]O (``method.dimo``) of the family's teacher into a
  one-step generator. The whole state is checkpointed in ``<workdir>/checkpoints`` (a rerun
  resumes after ``check_resume``); the finished EMA generator is written, gathered from every
  process, to ``<workdir>/generator`` with the family's ``generator_config``. The workdir is
  locked; the step is compiled for the SHAPES of the state and the run stops before anything
  large is allocated when it cannot fit the device; non-finite token gradients are zeroed by
  the step and counted, and ``config.distill.max_nonfinite_steps`` consecutive steps with any
  stop the run; SIGTERM writes a checkpoint and returns ``preempted``. Returns the last logged
  metrics, ``step`` and ``preempted`` (and the family's table with ``evaluate_at_end``)."""
  family = families.get_family(config)
  family.prepare_distill(config, workdir)
  steps, stop_after, workdir = loop_setup(config.distill, "distill", workdir, stop_after)
  with workdir_lock(workdir):
    teacher_path = family.teacher_to_train(config, workdir)
    if teacher_path:
      preflight.check_writable(teacher_path, "the folder of the teacher to train")
      logging.info("No finished teacher in %s: training it first.", teacher_path)
      final = train_teacher(config, teacher_path)
      if final.get(PREEMPTED):
        return dict(final, step=0)
    return _distill_loop(config, workdir, family, steps, stop_after)


def _distill_loop(config, workdir: str, family, steps: int, stop_after: Optional[int]) -> dict:
  import time  # pylint: disable=import-outside-toplevel
  from dimo_jax.method import dimo  # pylint: disable=import-outside-toplevel
  from dimo_jax.storage import loaders  # pylint: disable=import-outside-toplevel
  dc, seed = config.distill, int(config.seed)
  teacher = family.load_teacher(config, workdir)
  source = family.condition_source(config, teacher)
  dist = dimo.build_distiller(config, teacher.model, cond_spec=source.spec)
  if dist.s.divergence == "jeffreys" and dist.s.beta < 0:
    logging.warning("config.distill.divergence='jeffreys' with beta=%g < 0 diverges against a teacher that gives "
                    "some tokens zero (or near-zero) probability (docs/proofs.md, section 4); forward KL "
                    "(divergence='fkl' or beta=0) is the safe choice.", dist.s.beta)
  mesh = sharding.make_mesh(*family.mesh_axes(config))
  shapes = jax.eval_shape(lambda p: dist.init_state(p, seed), teacher.params)
  preflight.check_write_targets([
      (workdir, checkpoint_need(shapes, dc, workdir), "the distillation's checkpoints"),
      (loaders.generator_dir(workdir), preflight.checkpoint_bytes((shapes.gen.params, shapes.ema_params)),
       "the generator")])
  step_fn, shardings, need = dist.compile_abstract(shapes, mesh)  # refuses here when the step cannot fit
  if need:
    logging.info("XLA's estimate of the step: %.1f GB per device.", need / 1e9)
  state = jax.device_put(dist.init_state(teacher.params, seed), shardings)
  run_config = family.run_config(config, teacher)
  ckpt, start = make_checkpointer(dc, "distill", workdir, steps, run_config, config.get("resume_accept", ""))
  writer = None
  final = {}
  try:
    if start:
      fresh_teacher = state.teacher_params
      state, start = restore(ckpt, state, "distillation")
      if any(k.split(".")[0] in ("teacher", "model", "dataset") for k in ckpt.accepted):
        # An accepted change of teacher: distil the teacher the config names, not the stored copy.
        state = state.replace(teacher_params=fresh_teacher)
    if jax.process_index() == 0:
      checkpoints.write_config(workdir, run_config)
    writer = create_writer(workdir)
    log_every = max(int(dc.get("log_every", 100)), 1)
    sample_every = int(dc.get("sample_every", 0) or 0)
    progress = create_progress(steps, writer, every_steps=log_every)
    sample_key = jax.random.fold_in(jax.random.key(seed), 3)
    samples = os.path.join(workdir, "samples")
    if start == 0 and sample_every:
      family.teacher_grid(teacher, sample_key, os.path.join(samples, "teacher.png"), config)
    logging.info("Di[M]O (%s): %s teacher with %d parameters; %d steps at batch %d on %d devices.", family.name,
                 type(teacher.model).__name__, int(sum(x.size for x in jax.tree_util.tree_leaves(teacher.params))),
                 steps, dist.s.batch_size, mesh.size)
    history, step, t0 = [], start, time.time()
    watch = NonFiniteWatch(int(dc.get("max_nonfinite_steps", 100) or 0), "distill", ckpt)
    with PreemptionGuard() as guard:
      while step < steps:
        conds = source.step_conditions(seed, step, dist.s.batch_size, dist.s.aux_updates)
        state, metrics = step_fn(state) if conds is None else step_fn(state, dist.place_conditions(conds))
        step += 1
        history.append(metrics)
        watch.update(step, metrics)
        progress(step)
        if step % log_every == 0 or step == steps:
          final = log_window(history, step, writer, stop_on_nonfinite=False, name="distill")
        if step == steps:
          watch.flush()
        ckpt.save(step, state, force=step == steps or guard.requested)
        if sample_every and (step % sample_every == 0 or step == steps):
          family.sample_grid(dataclasses.replace(teacher, params=state.ema_params), jax.random.fold_in(sample_key, step),
                             os.path.join(samples, f"generator_{step:07d}.png"), config)
        if guard.requested or (stop_after and step >= stop_after and step < steps):
          logging.info("Stopping at step %d.", step)
          break
    ckpt.wait()
    final[PREEMPTED] = guard.requested and step < steps
    if step == steps:
      checkpoints.save_params(loaders.generator_dir(workdir), sharding.host_tree(state.gen.params),
                              family.generator_config(run_config, teacher, teacher.model, step),
                              ema_params=sharding.host_tree(state.ema_params), step=step)
    writer.flush()
    final["step"] = step
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  logging.info("Distillation stopped at step %d after %.1fs: %s", step, time.time() - t0, final)
  if step == steps and dc.get("evaluate_at_end", False):
    table = family.evaluate_table(config, workdir, teacher, sharding.host_tree(state.ema_params))
    if table is not None:
      final["table"] = table
    else:
      final["evaluate"] = True  # modes.distill runs mode=evaluate's table
  return final
