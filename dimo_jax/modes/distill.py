"""``mode=distill``: Di[M]O (``method.dimo``) of ``config.teacher.checkpoint`` into a one-step
generator; the finished EMA generator is written to ``<workdir>/generator``.

The workdir is locked for the run; a rerun resumes from the latest intact checkpoint after
checking that the config did not change what the run computes. Non-finite token gradients are
zeroed by the step and counted; ``config.distill.max_nonfinite_steps`` consecutive steps with
any stop the run.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging

from dimo_jax.core import samplers, sharding
from dimo_jax.core.sharding import host_array
from dimo_jax.converters import commands
from dimo_jax.data import image_grids
from dimo_jax.evaluation import tables
from dimo_jax.method import dimo
from dimo_jax.modes import evaluate, loop
from dimo_jax.modes.loop import (
  PreemptionGuard,
  create_progress,
  create_writer,
  log_window,
  loop_setup,
  make_checkpointer,
  write_sample_grid,
)
from dimo_jax.networks import maskgit
from dimo_jax.networks.conditioning import make_apply_fn, sample_label_grid
from dimo_jax.storage import checkpoints, loaders


# ---------------------------------------------------------------------------- mode=distill
def _generator_grid(path, model, params, key, *, vocab_size, image_shape, r_init, sigma):
  labels = jnp.asarray(sample_label_grid(model.num_classes))
  tokens = host_array(samplers.one_step_generate(model, params, key, labels, r_init=r_init, sigma=sigma))
  if jax.process_index() == 0:
    loop.save_grid(image_grids.tokens_to_images(tokens, vocab_size, image_shape), path,
                   ncols=model.num_classes if model.num_classes > 0 else None)


def train_distill(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Di[M]O distillation (``mode=distill``) of ``config.teacher.checkpoint`` into a one-step
  generator. The whole state is checkpointed in ``<workdir>/checkpoints`` (a rerun resumes);
  the finished EMA generator is written to ``<workdir>/generator`` for ``mode=sample`` /
  ``mode=evaluate``. Returns the last logged metrics, ``step`` and ``preempted``."""
  steps, stop_after, workdir = loop_setup(config.distill, "distill", workdir, stop_after)
  with loop.workdir_lock(workdir):
    return _train_distill(config, workdir, steps, stop_after)


def _load_teacher(config):
  """The teacher of ``config.teacher``; a missing folder names the command that makes it (and
  the VQGAN's, when that is missing too)."""
  try:
    return loaders.load_teacher(config.teacher.checkpoint, use_ema=bool(config.teacher.get("use_ema", True)),
                                overrides=maskgit.compute_overrides(config.model))
  except FileNotFoundError:
    commands.check_paths(config, which=("teacher", "vqgan"))
    raise


def _train_distill(config, workdir: str, steps: int, stop_after: Optional[int]) -> dict:
  dc = config.distill
  teacher_path = config.teacher.checkpoint
  model, teacher_params, stored = _load_teacher(config)
  info = stored.get("dataset") or {}
  image_shape = info.get("image_shape")
  mesh = sharding.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)))
  dist = dimo.build_distiller(config, model)
  if dist.s.divergence == "jeffreys" and dist.s.beta < 0:
    logging.warning("config.distill.divergence='jeffreys' with beta=%g < 0 diverges against a teacher that gives "
                    "some tokens zero (or near-zero) probability (docs/proofs.md, section 4); forward KL "
                    "(divergence='fkl' or beta=0) is the safe choice.", dist.s.beta)
  state = dist.init_state(teacher_params, int(config.seed))
  cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  stored_model = dict(stored.get("model", {}), **maskgit.compute_overrides(config.model))
  run_config = dict(cfg, model=stored_model, dataset=info, role="distill")

  ckpt, start = make_checkpointer(dc, "distill", workdir, steps, run_config, config.get("resume_accept", ""))
  writer = None
  final = {}
  try:
    if start:
      fresh_teacher = state.teacher_params
      state, start = loop.restore(ckpt, state, "distillation")
      if any(k.split(".")[0] in ("teacher", "model", "dataset") for k in ckpt.accepted):
        # An accepted change of teacher: distil the teacher the config names, not the stored copy.
        state = state.replace(teacher_params=fresh_teacher)
    step_fn, state = dist.compile_step(state, mesh)  # stops here if the step cannot fit the device
    if jax.process_index() == 0:
      checkpoints.write_config(workdir, run_config)

    writer = create_writer(workdir)
    log_every = max(int(dc.get("log_every", 100)), 1)
    sample_every = int(dc.get("sample_every", 0) or 0)
    progress = create_progress(steps, writer, every_steps=log_every)
    sample_key = jax.random.fold_in(jax.random.key(int(config.seed)), 3)
    grid_kw = dict(vocab_size=model.codebook_size, image_shape=image_shape, r_init=float(config.sample.r_init),
                   sigma=float(config.sample.sigma))
    if image_shape and start == 0 and sample_every:
      write_sample_grid(os.path.join(workdir, "samples", "teacher.png"), make_apply_fn(model), teacher_params,
                        sample_key, num_classes=model.num_classes, seq_len=model.seq_len,
                        vocab_size=model.codebook_size, image_shape=image_shape, sample_cfg=config.sample,
                        has_null_class=model.has_null_class)
    logging.info("Di[M]O: %s teacher with %d parameters from %s; %d steps at batch %d on %d devices.",
                 type(model).__name__, maskgit.count_params(teacher_params), teacher_path, steps,
                 dist.s.batch_size, mesh.size)
    history, step, t0 = [], start, time.time()
    watch = loop.NonFiniteWatch(int(dc.get("max_nonfinite_steps", 100) or 0), "distill", ckpt)
    with PreemptionGuard() as guard:
      while step < steps:
        state, metrics = step_fn(state)
        step += 1
        history.append(metrics)
        watch.update(step, metrics)
        progress(step)
        if step % log_every == 0 or step == steps:
          final = log_window(history, step, writer, stop_on_nonfinite=False, name="distill")
        if step == steps:
          watch.flush()
        ckpt.save(step, state, force=step == steps or guard.requested)
        if image_shape and sample_every and (step % sample_every == 0 or step == steps):
          _generator_grid(os.path.join(workdir, "samples", f"generator_{step:07d}.png"), model, state.ema_params,
                          jax.random.fold_in(sample_key, step), **grid_kw)
        if guard.requested or (stop_after and step >= stop_after and step < steps):
          logging.info("Stopping at step %d.", step)
          break
    ckpt.wait()
    final[loop.PREEMPTED] = guard.requested and step < steps
    if step == steps:
      gen_config = dict(run_config, role="generator")
      checkpoints.save_params(loaders.generator_dir(workdir), sharding.host_tree(state.gen.params), gen_config,
                              ema_params=sharding.host_tree(state.ema_params), step=step)
    writer.flush()
    final["step"] = step
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  logging.info("Distillation stopped at step %d after %.1fs: %s", step, time.time() - t0, final)
  if step == steps and dc.get("evaluate_at_end", False):
    results = evaluate.run_evaluate(config, workdir)
    table = tables.format_table(results)
    note = "\n".join(n for n in (tables.ratio_note(results), tables.token_note(results)) if n)
    table = table + ("\n\n" + note if note else "")
    if jax.process_index() == 0:
      print(table, flush=True)
    final["table"] = table
  return final


run = loop.entry(train_distill)  # what ``dimo_jax.main`` calls for ``config.mode='distill'``


def run(config, workdir: str, _classes=run):  # noqa: F811 (text-conditioned: modes/distill_text.py, distill_meissonic.py)
  from dimo_jax.modes import distill_meissonic, distill_text  # pylint: disable=import-outside-toplevel
  captioned, meissonic = config.get("data", {}).get("name", "") == "captioned_digits", "meissonic" in config
  return (distill_text.run if captioned else distill_meissonic.run if meissonic else _classes)(config, workdir)
