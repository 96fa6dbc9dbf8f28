"""``config.family = "classes"``: class-conditional token networks (``networks.maskgit``) on token
data with optional class labels: the embedded digits, your own token tables (``configs/tokens.py``)
and MaskGIT (``configs/maskgit.py``, ``configs/maskgit_google.py``).

The teacher trains with ``method.mdm`` on ``data.datasets``; its folder holds the network's
``model`` and the data's sizes (``dataset``) in ``config.json``. Class labels are the condition:
Di[M]O draws them uniformly inside its step, and guidance's negative condition is the null class.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core import samplers, sharding
from dimo_jax.core.sharding import global_batch, host_array
from dimo_jax.converters import commands
from dimo_jax.data import batching, datasets, image_grids
from dimo_jax.evaluation import token_metrics
from dimo_jax.evaluation.settings import sampler_settings_from_config
from dimo_jax.families import base
from dimo_jax.method import teacher_size
from dimo_jax.method.mdm import TeacherSettings, compile_teacher, evaluate_val_loss
from dimo_jax.networks import maskgit
from dimo_jax.networks.conditioning import make_apply_fn, null_labels, sample_label_grid
from dimo_jax.storage import checkpoints, loaders

REPORT_FILE = "teacher_report.json"  # the bound next to the data's entropies, the structure checks


def dataset_info(ds) -> dict:
  """Data sizes stored in ``config.json`` under ``dataset``."""
  return {"name": ds.name, "vocab_size": int(ds.vocab_size), "seq_len": int(ds.seq_len),
          "num_classes": int(ds.num_classes),
          "image_shape": None if ds.image_shape is None else [int(s) for s in ds.image_shape]}


SIZED_FIELDS = (("model", "width"), ("model", "depth"), ("model", "heads"), ("model", "mlp_dim"), ("train", "steps"))


def sized_config(config, ds):
  """``config`` with the teacher's sizes left at 0 (``SIZED_FIELDS``) chosen from the data ``ds``
  and ``config.train.budget`` (``method.teacher_size.choose``; the user's values are kept), the
  choice logged in one line; ``config`` itself when nothing is left at 0."""
  values = {f"{a}.{b}": int(config[a].get(b, 0) or 0) for a, b in SIZED_FIELDS}
  if all(values.values()):
    return config
  budget = teacher_size.parse_budget(config.train.get("budget", ""))
  chosen = teacher_size.choose(ds.num_train, ds.seq_len, ds.vocab_size, batch=int(config.train.batch_size),
                               budget_flops=budget, num_classes=ds.num_classes,
                               **{k.split(".")[1]: v for k, v in values.items()})
  logging.info("Teacher sized to the data: %s.", chosen["why"])
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for a, b in SIZED_FIELDS:
      config[a][b] = int(chosen[b])
  return config


def stored_report_warning(teacher_path: str) -> Optional[str]:
  """The warning ``mode=distill`` gives before distilling the teacher in ``teacher_path`` when its
  ``teacher_report.json`` says its samples break structure the data always holds; None otherwise
  (no report, a converted checkpoint, or no broken rule)."""
  if not teacher_path or not os.path.isdir(teacher_path):
    return None
  report = checkpoints.read_config(teacher_path, REPORT_FILE)
  if not isinstance(report, dict):
    return None
  broken = [c for c in report.get("structure", []) if c.get("broken", 0.0) > report.get("tolerance", 0.01)]
  if not broken:
    return None
  worst = max(broken, key=lambda c: c["broken"])
  advice = report.get("next_budget") or teacher_size.next_budget(report.get("budget_flops"))
  return (f"the teacher in {teacher_path} breaks structure its data always holds ({worst['rule']} in "
          f"{worst['broken']:.1%} of its samples, {len(broken)} rule(s) in all: {REPORT_FILE}); its generator will "
          f"break it too. Retrain the teacher with more budget ({advice}) before distilling.")


def save_grid(images, path: str, **kwargs) -> str:
  """``image_grids.save_image_grid`` with the user's umask on the PNG (its temporary file is 0600)."""
  image_grids.save_image_grid(images, path, **kwargs)
  if not checkpoints.is_remote(path):
    checkpoints.apply_umask(path)
  return path


def write_sample_grid(path: str, apply_fn, params, key, *, num_classes: int, seq_len: int,
                      vocab_size: int, image_shape, sample_cfg, has_null_class: bool = True):
  """Draws a grid with the confidence sampler (``config.sample`` read by
  ``evaluation.settings.sampler_settings_from_config``, as every mode reads it); process 0 saves
  the PNG (every process must call this: the sampler runs on the global parameters)."""
  st = sampler_settings_from_config(sample_cfg)
  labels = sample_label_grid(num_classes)
  guidance = float(1.0 if st.guidance is None else st.guidance) if (has_null_class and num_classes > 0) else 1.0
  tokens = samplers.confidence_sampler(
      apply_fn, params, key, jnp.asarray(labels), seq_len=seq_len, codebook_size=vocab_size,
      steps=int(min(st.steps, seq_len)), schedule=st.schedule,
      temperature=float(1.0 if st.temperature is None else st.temperature), r_temp=st.r_temp, guidance=guidance,
      guidance_schedule=st.guidance_schedule, null_label=num_classes, top_k=st.top_k, top_p=st.top_p)
  tokens = host_array(tokens)
  if jax.process_index() == 0:
    images = image_grids.tokens_to_images(tokens, vocab_size, image_shape)
    save_grid(images, path, ncols=num_classes if num_classes > 0 else None)
  return path


class Classes(base.Family):
  """Class-conditional token networks (module docstring)."""

  name = "classes"
  compute_fields = maskgit.COMPUTE_FIELDS
  evaluators = ("image_sets", "token_tv")

  # -------------------------------------------------------------- mode=teacher
  def sized_teacher_config(self, config):
    """``sized_config`` on the data ``config.data`` names (read by ``data.datasets``)."""
    fields = [int(config[a].get(b, 0) or 0) for a, b in SIZED_FIELDS]
    return config if all(fields) else sized_config(config, datasets.load_dataset(config.data))

  def teacher_run(self, config, workdir: str, mesh) -> base.TeacherRun:
    tc = config.train
    ds = datasets.load_dataset(config.data)
    model = maskgit.build_model(config.model, codebook_size=ds.vocab_size, seq_len=ds.seq_len,
                                num_classes=ds.num_classes)
    label_dropout = float(tc.get("label_dropout", 0.0) or 0.0)
    if label_dropout > 0 and ds.num_classes > 0 and not model.has_null_class:
      raise ValueError(f"config.train.label_dropout={label_dropout} needs a null class, which "
                       f"model.arch={config.model.arch!r} lacks; set --config.train.label_dropout=0")
    mask_id, null_label = ds.vocab_size, ds.num_classes
    batch_size = int(tc.batch_size)
    sharding.check_batch(batch_size, mesh, "config.train.batch_size")
    n_proc, proc = jax.process_count(), jax.process_index()
    if batch_size % n_proc:
      raise ValueError(f"config.train.batch_size={batch_size} must be a multiple of the {n_proc} processes")
    fns = compile_teacher(model, mesh, TeacherSettings.from_config(tc, int(tc.steps)), mask_id, ds.num_classes)
    apply_fn = make_apply_fn(model)
    seed = int(config.seed)

    def batches(start):
      # Batch k of the run is a pure function of (seed, k): a resumed run continues the stream.
      it = batching.batch_iterator(ds.train_tokens, ds.train_labels, batch_size // n_proc,
                                   int(tc.get("data_seed", seed)), shard_index=proc, num_shards=n_proc,
                                   start_step=start)
      for tokens, labels in it:
        if labels is None:
          labels = null_labels(tokens.shape[0], null_label)
        yield global_batch(tokens, fns.batch_sharding), global_batch(labels, fns.batch_sharding)

    def validate(state):
      return evaluate_val_loss(apply_fn, state.ema_params, ds.val_tokens, ds.val_labels, mask_id=mask_id,
                               null_label=null_label, key=jax.random.fold_in(jax.random.key(seed), 2),
                               batch_size=int(tc.get("eval_batch_size", 0) or batch_size),
                               schedule=tc.get("mask_schedule", "arccos"), exact=True)

    def samples(state, step, path):
      write_sample_grid(path, apply_fn, state.ema_params, jax.random.fold_in(jax.random.fold_in(
          jax.random.key(seed), 3), step), num_classes=ds.num_classes, seq_len=ds.seq_len,
                        vocab_size=ds.vocab_size, image_shape=ds.image_shape, sample_cfg=config.sample,
                        has_null_class=model.has_null_class)

    def finish(state, step, final):
      if int(tc.get("structure_samples", 0) or 0) <= 0 or not (ds.num_classes == 0 or model.has_null_class):
        return {}
      report = token_metrics.teacher_report(
          apply_fn, state.ema_params, ds.train_tokens, ds.val_tokens, vocab_size=ds.vocab_size, mask_id=mask_id,
          null_label=null_label, key=jax.random.fold_in(jax.random.key(seed), 5),
          num_samples=int(tc.structure_samples), budget_flops=teacher_size.parse_budget(tc.get("budget", "")),
          sizes={"width": model.width, "depth": model.depth, "steps": int(tc.steps), "trained": int(step)})
      if proc == 0:
        checkpoints.write_config(workdir, report, filename=REPORT_FILE)
      return {"val_nll_bound": report.get("val_nll_bound"), "structure_warnings": len(report["warnings"])}

    describe = (f"{type(model).__name__}, {ds.num_train} train / {ds.num_val} val sequences of length "
                f"{ds.seq_len}, vocabulary {ds.vocab_size}, {ds.num_classes} classes")
    return base.TeacherRun(model=model, fns=fns, run_config=dict(base.config_dict(config), dataset=dataset_info(ds)),
                           batches=batches, describe=describe, validate=validate,
                           samples=samples if ds.image_shape is not None else None, finish=finish)

  # -------------------------------------------------------------- mode=distill
  def prepare_distill(self, config, workdir: str) -> None:
    warning = stored_report_warning(str(config.teacher.get("checkpoint", "") or ""))
    if warning:
      logging.warning("%s", warning)

  # -------------------------------------------------------------- networks
  def load_teacher(self, config, workdir: str) -> base.Loaded:
    try:
      model, params, stored = loaders.load_teacher(
          config.teacher.checkpoint, use_ema=bool(config.teacher.get("use_ema", True)),
          overrides=self.compute_overrides(config))
    except FileNotFoundError:
      commands.check_paths(config, which=("teacher", "vqgan"))
      raise
    return base.Loaded(model, params, stored)

  def load_generator(self, config, path: str) -> base.Loaded:
    return base.Loaded(*loaders.load_generator(path, overrides=self.compute_overrides(config)))

  def condition_source(self, config, teacher: base.Loaded) -> base.ConditionSource:
    return base.ClassLabels(teacher.model.num_classes)

  def run_config(self, config, teacher: base.Loaded) -> dict:
    stored_model = dict(teacher.stored.get("model", {}), **self.compute_overrides(config))
    return dict(super().run_config(config, teacher), model=stored_model,
                dataset=teacher.stored.get("dataset") or {}, role="distill")

  # -------------------------------------------------------------- what a person looks at
  def decode(self, tokens, stored: dict):
    info = stored.get("dataset") or {}
    if not info.get("image_shape"):
      return None
    return image_grids.tokens_to_images(tokens, int(info["vocab_size"]), info["image_shape"])

  def teacher_grid(self, loaded: base.Loaded, key, path: str, config):
    info, model = loaded.stored.get("dataset") or {}, loaded.model
    if not info.get("image_shape"):
      return None
    return write_sample_grid(path, make_apply_fn(model), loaded.params, key, num_classes=model.num_classes,
                             seq_len=model.seq_len, vocab_size=model.codebook_size,
                             image_shape=info["image_shape"], sample_cfg=config.sample,
                             has_null_class=model.has_null_class)

  def sample_grid(self, loaded: base.Loaded, key, path: str, config):
    model = loaded.model
    labels = jnp.asarray(sample_label_grid(model.num_classes))
    tokens = host_array(samplers.one_step_generate(model, loaded.params, key, labels,
                                                   r_init=float(config.sample.r_init),
                                                   sigma=float(config.sample.sigma)))
    images = self.decode(np.asarray(tokens), loaded.stored)
    if images is None:
      return None
    if jax.process_index() == 0:
      save_grid(images, path, ncols=model.num_classes if model.num_classes > 0 else None)
    return path


FAMILY = Classes()


