"""Loop plumbing shared by the modes: metric writers and progress (clu, which brings TensorFlow, is
imported inside the functions that use it), the workdir and checkpointer setup, preemption,
sample grids, and the entry every mode's ``run`` goes through.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core import samplers, sharding
from dimo_jax.core.sharding import host_array
from dimo_jax.data import image_grids
from dimo_jax.networks.conditioning import sample_label_grid
from dimo_jax.storage import checkpoints


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


def log_window(history: list, step: int, writer, prefix: str = "") -> dict:
  """Writes the mean of the metrics gathered since the last call (and empties ``history``);
  stops the run on a non-finite value."""
  summary = mean_metrics(history)
  history.clear()
  if not all(math.isfinite(v) for v in summary.values()):
    raise FloatingPointError(f"non-finite metrics at step {step}: {summary}")
  writer.write_scalars(step, {prefix + k: v for k, v in summary.items()})
  return summary


def mean_metrics(history):
  """Mean of a list of metric dicts (device arrays), fetched once."""
  if not history:
    return {}
  stacked = jax.device_get(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *history))
  return {k: float(np.mean(v)) for k, v in stacked.items()}


def dataset_info(ds) -> dict:
  """Data sizes stored in ``config.json`` under ``dataset``."""
  return {"name": ds.name, "vocab_size": int(ds.vocab_size), "seq_len": int(ds.seq_len),
          "num_classes": int(ds.num_classes),
          "image_shape": None if ds.image_shape is None else [int(s) for s in ds.image_shape]}


def write_sample_grid(path: str, apply_fn, params, key, *, num_classes: int, seq_len: int,
                      vocab_size: int, image_shape, sample_cfg, has_null_class: bool = True):
  """Draws a grid with the confidence sampler (settings from ``config.sample``); process 0 saves
  the PNG (every process must call this: the sampler runs on the global parameters)."""
  get = sample_cfg.get
  labels = sample_label_grid(num_classes)
  guidance = float(get("guidance", 1.0)) if (has_null_class and num_classes > 0) else 1.0
  tokens = samplers.confidence_sampler(
      apply_fn, params, key, jnp.asarray(labels), seq_len=seq_len, codebook_size=vocab_size,
      steps=int(min(get("steps", 8), seq_len)), schedule=get("schedule", "arccos"),
      temperature=float(get("temperature", 1.0)), r_temp=float(get("r_temp", 4.5)), guidance=guidance,
      guidance_schedule=get("guidance_schedule", "constant"), null_label=num_classes,
      top_k=int(get("top_k", 0)), top_p=float(get("top_p", 1.0)))
  tokens = host_array(tokens)
  if jax.process_index() == 0:
    images = image_grids.tokens_to_images(tokens, vocab_size, image_shape)
    image_grids.save_image_grid(images, path, ncols=num_classes if num_classes > 0 else None)
  return path


# ---------------------------------------------------------------------------- loop setup
def loop_setup(section, name: str, workdir: str, stop_after: Optional[int]):
  """Checks the common loop fields of ``config.<name>``; returns (steps, stop_after, workdir)."""
  if not workdir:
    raise ValueError(f"config.{name}: the run needs a workdir (--workdir=<dir>)")
  steps = int(section.steps)
  if steps < 1:
    raise ValueError(f"config.{name}.steps must be >= 1, got {steps}")
  if stop_after is None:
    stop_after = int(section.get("stop_after", 0) or 0) or None
  workdir = checkpoints.abspath(workdir)
  checkpoints.makedirs(workdir)
  return steps, stop_after, workdir


def make_checkpointer(section, name: str, workdir: str, steps: int):
  """The loop's Checkpointer and the step to start from (its latest checkpoint, or 0)."""
  every = int(section.get("checkpoint_every", 0) or 0)
  ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(workdir),
                                  max_to_keep=int(section.get("keep_checkpoints", 2)),
                                  save_interval=every if every > 0 else steps)
  start = ckpt.latest_step() or 0
  if start > steps:
    ckpt.close()
    raise ValueError(f"{ckpt.directory!r} holds a checkpoint at step {start}, beyond "
                     f"config.{name}.steps={steps}; use another --workdir or raise the step count")
  return ckpt, start


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

