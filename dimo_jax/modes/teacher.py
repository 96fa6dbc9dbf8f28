"""``mode=teacher``: trains a masked diffusion model on token data (``method.mdm``).

Resumes from the latest intact checkpoint of its workdir (after checking that the config did not
change what the run computes); each step's randomness and batch are pure functions of the step,
so an interrupted run ends with the parameters of an uninterrupted one. The workdir is locked
for the run.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

from dimo_jax.core import sharding
from dimo_jax.core.sharding import global_batch
from dimo_jax.data import batching, datasets
from dimo_jax.evaluation import token_metrics
from dimo_jax.method.mdm import Plateau, TeacherSettings, compile_teacher, evaluate_val_loss
from dimo_jax.modes import loop
from dimo_jax.modes.loop import (
  PreemptionGuard,
  create_progress,
  create_writer,
  dataset_info,
  log_window,
  loop_setup,
  make_checkpointer,
  write_sample_grid,
)
from dimo_jax.networks import maskgit
from dimo_jax.networks.conditioning import make_apply_fn, null_labels
from dimo_jax.storage import checkpoints


# ---------------------------------------------------------------------------- mode=teacher
EARLY_STOP_FILE = "early_stop.json"  # written when the validation loss stopped the run
REPORT_FILE = "teacher_report.json"  # the bound next to the data's entropies, the structure checks

def train_teacher(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Trains a teacher MDM; checkpoints in ``<workdir>/checkpoints``, config in ``config.json``.

  Resumes from the latest checkpoint in ``workdir``. ``stop_after`` (or ``config.train.stop_after``)
  ends the loop after that many steps without a final checkpoint, as if the run were killed.
  Returns the final metrics: ``step``, ``train_loss`` (mean of the last logging window),
  ``val_loss`` and ``val_acc`` (EMA parameters, see ``evaluate_val_loss``; only when the run
  reached ``config.train.steps``), ``val_loss_initial`` (before the first step, when
  ``eval_every`` > 0 and the run started from scratch) and ``preempted`` (SIGTERM stopped it).
  """
  steps, stop_after, workdir = loop_setup(config.train, "train", workdir, stop_after)
  with loop.workdir_lock(workdir):
    return _train_teacher(config, workdir, steps, stop_after)


def _train_teacher(config, workdir: str, steps: int, stop_after: Optional[int]) -> dict:
  tc = config.train
  ds = datasets.load_dataset(config.data)
  info = dataset_info(ds)
  model = maskgit.build_model(config.model, codebook_size=ds.vocab_size, seq_len=ds.seq_len,
                             num_classes=ds.num_classes)
  label_dropout = float(tc.get("label_dropout", 0.0) or 0.0)
  if label_dropout > 0 and ds.num_classes > 0 and not model.has_null_class:
    raise ValueError(f"config.train.label_dropout={label_dropout} needs a null class, which "
                     f"model.arch={config.model.arch!r} lacks; set --config.train.label_dropout=0")
  mask_id = ds.vocab_size
  null_label = ds.num_classes

  mesh = sharding.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)))
  batch_size = int(tc.batch_size)
  sharding.check_batch(batch_size, mesh, "config.train.batch_size")
  n_proc, proc = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise ValueError(f"config.train.batch_size={batch_size} must be a multiple of the {n_proc} processes")

  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  run_config = dict(cfg, dataset=info)
  ckpt, start = make_checkpointer(tc, "train", workdir, steps, run_config, config.get("resume_accept", ""))
  writer = None
  try:
    settings = TeacherSettings.from_config(tc, steps)
    fns = compile_teacher(model, mesh, settings, mask_id, ds.num_classes)
    state = fns.init(jnp.int32(int(config.seed)))
    batch_shard = fns.batch_sharding
    if start:
      state, start = loop.restore(ckpt, state, "the teacher")
    # Batch k of the run is a pure function of (seed, k): a resumed run continues the stream.
    batches = batching.batch_iterator(ds.train_tokens, ds.train_labels, batch_size // n_proc,
                                  int(tc.get("data_seed", config.seed)), shard_index=proc, num_shards=n_proc,
                                  start_step=start)
    if proc == 0:
      checkpoints.write_config(workdir, run_config)
    train_step = fns.step

    apply_fn = make_apply_fn(model)
    val_key = jax.random.fold_in(jax.random.key(int(config.seed)), 2)
    sample_key = jax.random.fold_in(jax.random.key(int(config.seed)), 3)

    def validate():
      return evaluate_val_loss(apply_fn, state.ema_params, ds.val_tokens, ds.val_labels, mask_id=mask_id,
                               null_label=null_label, key=val_key,
                               batch_size=int(tc.get("eval_batch_size", 0) or batch_size),
                               schedule=tc.get("mask_schedule", "arccos"), exact=True)

    def write_samples(step):
      if ds.image_shape is None:
        return
      path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
      write_sample_grid(path, apply_fn, state.ema_params, jax.random.fold_in(sample_key, step),
                        num_classes=ds.num_classes, seq_len=ds.seq_len, vocab_size=ds.vocab_size,
                        image_shape=ds.image_shape, sample_cfg=config.sample, has_null_class=model.has_null_class)
      if proc == 0:
        logging.info("Wrote %s", path)

    writer = create_writer(workdir)
    log_every = max(int(tc.get("log_every", 100)), 1)
    eval_every = int(tc.get("eval_every", 0) or 0)
    sample_every = int(tc.get("sample_every", 0) or 0)
    progress = create_progress(steps, writer, every_steps=log_every)
    logging.info("Teacher: %s, %d parameters, %d train / %d val sequences of length %d, vocabulary %d, %d classes.",
                 type(model).__name__, maskgit.count_params(state.params), ds.num_train, ds.num_val,
                 ds.seq_len, ds.vocab_size, ds.num_classes)

    # Early stopping (config.train.patience > 0): the best EMA parameters are kept and saved as the
    # final checkpoint; a marker file keeps a rerun from training past them.
    plateau = Plateau(int(tc.get("patience", 0) or 0), float(tc.get("min_delta", 1e-3) or 0.0))
    marker = os.path.join(workdir, EARLY_STOP_FILE)
    stopped = bool(start and os.path.exists(marker))
    best_ema = None
    final = {"step": start, "train_loss": float("nan"), loop.PREEMPTED: False}
    history = []
    step = start
    t0 = time.time()
    if start == 0 and eval_every:
      val = validate()
      writer.write_scalars(0, {f"val/{k[4:]}": v for k, v in val.items()})
      final["val_loss_initial"] = val["val_loss"]
    with PreemptionGuard() as guard:
      while step < steps and not stopped:
        tokens, labels = next(batches)
        if labels is None:
          labels = null_labels(tokens.shape[0], null_label)
        state, metrics = train_step(state, global_batch(tokens, batch_shard), global_batch(labels, batch_shard))
        step += 1
        history.append(metrics)
        progress(step)
        if step % log_every == 0 or step == steps:
          final["train_loss"] = log_window(history, step, writer, "train/")["loss"]
        ckpt.save(step, state, force=step == steps or guard.requested)
        if eval_every and step % eval_every == 0 and step != steps:
          val = validate()
          writer.write_scalars(step, {f"val/{k[4:]}": v for k, v in val.items()})
          if plateau.update(step, val["val_loss"]) and plateau.patience:
            best_ema = jax.device_get(state.ema_params)
          if plateau.stop and best_ema is not None:
            logging.info("Validation loss not improved by %g for %d evaluations (best %.5f at step %d): stopping "
                         "at step %d with the best EMA parameters.", plateau.min_delta, plateau.patience,
                         plateau.best, plateau.best_step, step)
            state = state.replace(ema_params=jax.tree_util.tree_map(
                lambda b, a: jax.device_put(b, a.sharding), best_ema, state.ema_params))
            stopped = True
            if proc == 0:
              checkpoints.write_config(workdir, {"step": step, "best_step": plateau.best_step,
                                                 "best_val_loss": plateau.best}, filename=EARLY_STOP_FILE)
            break
        if sample_every and step % sample_every == 0:
          write_samples(step)
        if guard.requested or (stop_after and step >= stop_after and step < steps):
          logging.info("Stopping at step %d.", step)
          break
      final[loop.PREEMPTED] = guard.requested and step < steps
    final["step"] = step
    if stopped:
      final["early_stop"] = True
    if step == steps or stopped:
      ckpt.save(step, state, force=True)
      val = validate()
      writer.write_scalars(step, {f"val/{k[4:]}": v for k, v in val.items()})
      final.update(val)
      if int(tc.get("structure_samples", 0) or 0) > 0 and (ds.num_classes == 0 or model.has_null_class):
        report = token_metrics.teacher_report(
            apply_fn, state.ema_params, ds.train_tokens, ds.val_tokens, vocab_size=ds.vocab_size, mask_id=mask_id,
            null_label=null_label, key=jax.random.fold_in(jax.random.key(int(config.seed)), 5),
            num_samples=int(tc.structure_samples))
        final["val_nll_bound"] = report.get("val_nll_bound")
        final["structure_warnings"] = len(report["warnings"])
        if proc == 0:
          checkpoints.write_config(workdir, report, filename=REPORT_FILE)
      if sample_every and step % sample_every:
        write_samples(step)
    writer.flush()
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  logging.info("Teacher training finished at step %d after %.1fs: %s", step, time.time() - t0, final)
  return final


run = loop.entry(train_teacher)  # what ``dimo_jax.main`` calls for ``config.mode='teacher'``


def run(config, workdir: str, _classes=run):  # noqa: F811 (text-conditioned data: modes/teacher_text.py)
  from dimo_jax.modes import teacher_text  # pylint: disable=import-outside-toplevel
  return (teacher_text.run if config.get("data", {}).get("name", "") == "captioned_digits" else _classes)(config, workdir)
