"""Teacher training (``mode=teacher``) and helpers shared with the distillation loop.

A masked diffusion model is trained on token data with AdamW (warm-up then cosine or constant
learning rate), global-norm clipping, an EMA of the parameters and label dropout to the null
class (for classifier-free guidance). Each step draws its randomness from
``fold_in(rng, step)`` and its batch from ``data.batch_iterator(..., start_step=step)``, so a
run restarted from its latest checkpoint ends with exactly the parameters of an uninterrupted
run. This module (with the data layer) is the only place where TensorFlow may enter: clu's
metric writers are imported inside the functions that use them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dimo_jax import checkpoints, losses, masking, models, sharding

LR_SCHEDULES = ("constant", "cosine")


@flax.struct.dataclass
class TrainState:
  """Teacher training state. ``rng`` holds raw key data (``jax.random.key_data``)."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jnp.ndarray


# ---------------------------------------------------------------------------- schedules / optimizer
def make_lr_schedule(lr: float, steps: int, warmup_steps: int = 0, kind: str = "cosine",
                     end_value: float = 0.0) -> Callable:
  """Learning rate per step: linear warm-up ``lr * (step + 1) / warmup_steps`` for the first
  ``warmup_steps`` steps, then ``constant`` at ``lr`` or ``cosine`` from ``lr`` (at the end of
  warm-up) to ``end_value`` (at ``steps``)."""
  if kind not in LR_SCHEDULES:
    raise ValueError(f"unknown learning-rate schedule {kind!r} (config lr_schedule); choose one of {LR_SCHEDULES}")
  if warmup_steps < 0 or steps < 1:
    raise ValueError(f"need steps >= 1 and warmup_steps >= 0, got steps={steps}, warmup_steps={warmup_steps}")
  lr, end_value = float(lr), float(end_value)
  warmup = int(warmup_steps)
  decay_steps = max(int(steps) - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if kind == "constant":
      main = jnp.full_like(step, lr)
    else:
      frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
      main = end_value + (lr - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    if warmup == 0:
      return main
    return jnp.where(step < warmup, lr * (step + 1.0) / warmup, main)

  return schedule


def weight_decay_mask(params):
  """True for matrices (``kernel``) and embedding tables; biases, LayerNorms, positions and
  the output bias are not decayed."""
  def decay(path, _):
    name = getattr(path[-1], "key", getattr(path[-1], "name", ""))
    return name in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(train_cfg, steps: Optional[int] = None) -> optax.GradientTransformation:
  """AdamW with ``make_lr_schedule`` and global-norm clipping from ``config.train``."""
  return TeacherSettings.from_config(train_cfg, steps).optimizer()


def ema_update(ema, params, step, decay: float):
  """EMA with the warm-up rate ``min(decay, (1 + t) / (10 + t))`` at step t."""
  t = jnp.asarray(step, jnp.float32)
  rate = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
  return jax.tree_util.tree_map(lambda e, p: (rate * e + (1.0 - rate) * p).astype(e.dtype), ema, params)


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


# ---------------------------------------------------------------------------- model helpers
@functools.lru_cache(maxsize=32)
def make_apply_fn(model) -> Callable:
  """``apply_fn(params, tokens, labels) -> logits`` in eval mode (samplers' convention).

  Cached per model, so jit-compiled users (samplers, validation) reuse their programs."""
  def apply_fn(params, tokens, labels):
    return model.apply({"params": params}, tokens, labels, deterministic=True)
  return apply_fn


def dataset_info(ds) -> dict:
  """Data sizes stored in ``config.json`` under ``dataset``."""
  return {"name": ds.name, "vocab_size": int(ds.vocab_size), "seq_len": int(ds.seq_len),
          "num_classes": int(ds.num_classes),
          "image_shape": None if ds.image_shape is None else [int(s) for s in ds.image_shape]}


def null_labels(batch: int, num_classes: int):
  return np.full((batch,), num_classes, np.int32)


# ---------------------------------------------------------------------------- validation
@functools.partial(jax.jit, static_argnames=("apply_fn", "mask_id", "schedule", "exact", "loss_on",
                                             "label_smoothing"))
def _eval_batch(apply_fn, params, tokens, labels, valid, key, *, mask_id, schedule, exact, loss_on,
                label_smoothing):
  x_t, mask, _ = masking.forward_mask(key, tokens, mask_id, schedule, exact=exact)
  logits = apply_fn(params, x_t, labels)
  q = losses.smoothed_targets(tokens, logits.shape[-1], mask_id, label_smoothing)
  ce = losses.token_cross_entropy(logits, q)
  valid = valid[:, None]
  masked = (mask & valid).astype(jnp.float32)
  weight = masked if loss_on == "masked" else jnp.broadcast_to(valid, ce.shape).astype(jnp.float32)
  correct = (jnp.argmax(logits[..., :mask_id], axis=-1) == tokens).astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce * weight), "weight": jnp.sum(weight),
          "correct": jnp.sum(correct * masked), "masked": jnp.sum(masked)}


def evaluate_val_loss(apply_fn, params, tokens, labels, *, mask_id: int, null_label: int, key,
                      batch_size: int = 128, schedule: str = "arccos", exact: bool = True,
                      loss_on: str = "masked", label_smoothing: float = 0.0) -> dict:
  """Validation loss over a whole token set with a fixed masking key.

  Batch i is masked with ``fold_in(key, i)`` (the last batch is padded; padding does not
  count), so equal keys give comparable numbers. ``val_loss``: cross-entropy per masked token
  (``loss_on='masked'``, unsmoothed by default) or per token (``'all'``); ``val_acc``: argmax
  accuracy on masked tokens. ``labels`` None means unconditional (the null class).
  """
  tokens = np.asarray(tokens, np.int32)
  n = tokens.shape[0]
  if n == 0:
    return {"val_loss": float("nan"), "val_acc": float("nan")}
  labels = null_labels(n, null_label) if labels is None else np.asarray(labels, np.int32)
  batch_size = int(min(batch_size, n))
  totals = None
  for i, start in enumerate(range(0, n, batch_size)):
    tok = tokens[start:start + batch_size]
    lab = labels[start:start + batch_size]
    valid = np.ones((batch_size,), bool)
    if tok.shape[0] < batch_size:
      pad = batch_size - tok.shape[0]
      valid[tok.shape[0]:] = False
      tok = np.concatenate([tok, np.zeros((pad, tok.shape[1]), np.int32)])
      lab = np.concatenate([lab, np.full((pad,), null_label, np.int32)])
    out = _eval_batch(apply_fn, params, tok, lab, valid, jax.random.fold_in(key, i), mask_id=int(mask_id),
                      schedule=schedule, exact=bool(exact), loss_on=loss_on,
                      label_smoothing=float(label_smoothing))
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {"val_loss": float(totals["loss_sum"] / max(totals["weight"], 1.0)),
          "val_acc": float(totals["correct"] / max(totals["masked"], 1.0))}


# ---------------------------------------------------------------------------- sample grids
def sample_label_grid(num_classes: int, per_class: int = 8, unconditional: int = 64):
  """Labels for a grid: ``per_class`` rows of 0..C-1 (one class per column), or null labels."""
  if num_classes <= 0:
    return np.zeros((unconditional,), np.int32)
  return np.tile(np.arange(num_classes, dtype=np.int32), per_class)


def host_array(x) -> np.ndarray:
  """A numpy copy of a (possibly multi-host sharded) array, the same on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def write_sample_grid(path: str, apply_fn, params, key, *, num_classes: int, seq_len: int,
                      vocab_size: int, image_shape, sample_cfg, has_null_class: bool = True):
  """Draws a grid with the confidence sampler (settings from ``config.sample``); process 0 saves
  the PNG (every process must call this: the sampler runs on the global parameters)."""
  from dimo_jax import data, samplers  # pylint: disable=import-outside-toplevel
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
    images = data.tokens_to_images(tokens, vocab_size, image_shape)
    data.save_image_grid(images, path, ncols=num_classes if num_classes > 0 else None)
  return path


# ---------------------------------------------------------------------------- the train step
def make_train_step(model, tx, *, mask_id: int, num_classes: int, label_dropout: float = 0.0,
                    schedule: str = "arccos", exact: bool = False, loss_on: str = "all",
                    label_smoothing: float = 0.0, ema_decay: float = 0.999,
                    lr_schedule: Optional[Callable] = None) -> Callable:
  """Pure ``step(state, tokens, labels) -> (state, metrics)``.

  Randomness: ``fold_in(wrap_key_data(state.rng), state.step)`` split into label dropout,
  masking and dropout keys. Labels of conditional data are replaced by the null class
  (``num_classes``) with probability ``label_dropout``.
  """
  null = int(num_classes)

  def step(state: TrainState, tokens, labels):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_label, k_mask, k_drop = jax.random.split(key, 3)
    if num_classes > 0 and label_dropout > 0:
      drop = jax.random.uniform(k_label, labels.shape) < label_dropout
      labels = jnp.where(drop, null, labels)
    x_t, mask, _ = masking.forward_mask(k_mask, tokens, mask_id, schedule, exact=exact)

    def loss_fn(params):
      logits = model.apply({"params": params}, x_t, labels, deterministic=False, rngs={"dropout": k_drop})
      return losses.mdm_loss(logits, tokens, mask, loss_on=loss_on, label_smoothing=label_smoothing)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, ema_decay)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new_state, metrics

  return step


def _init_fn(model, tx):
  def init(seed):
    base = jax.random.key(seed)
    params = models.init_params(model, jax.random.fold_in(base, 0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      rng=jax.random.key_data(jax.random.fold_in(base, 1)))
  return init


def init_train_state(model, tx, seed: int, mesh=None) -> TrainState:
  """Parameters from ``fold_in(key(seed), 0)``, training randomness from ``fold_in(key(seed), 1)``.

  Built by one compiled function; with a ``mesh`` the state is created already sharded
  (``sharding.fsdp_shardings``).
  """
  init = _init_fn(model, tx)
  if mesh is None:
    return jax.jit(init)(jnp.int32(seed))
  shardings = sharding.fsdp_shardings(jax.eval_shape(init, jnp.int32(0)), mesh)
  return jax.jit(init, out_shardings=shardings)(jnp.int32(seed))


@dataclasses.dataclass(frozen=True)
class TeacherSettings:
  """The ``config.train`` fields that shape the compiled step (hashable)."""
  steps: int
  lr: float = 1e-3
  warmup_steps: int = 0
  lr_schedule: str = "cosine"
  end_lr: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 0.0
  ema_decay: float = 0.999
  label_dropout: float = 0.0
  mask_schedule: str = "arccos"
  exact_mask: bool = False
  loss_on: str = "all"
  label_smoothing: float = 0.0

  @classmethod
  def from_config(cls, train_cfg, steps: Optional[int] = None) -> "TeacherSettings":
    get = train_cfg.get
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name == "steps":
        continue
      value = get(f.name, None)
      if value is not None:
        kw[f.name] = type(f.default)(value)
    return cls(steps=int(steps or get("steps")), **kw)

  def schedule(self) -> Callable:
    return make_lr_schedule(self.lr, self.steps, self.warmup_steps, self.lr_schedule, self.end_lr)

  def optimizer(self) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip > 0 else []
    parts.append(optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                             weight_decay=self.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class TeacherFns:
  tx: Any
  init: Callable  # seed -> TrainState (sharded)
  step: Callable  # (state, tokens, labels) -> (state, metrics); donates the state
  state_shardings: Any
  batch_sharding: Any


@functools.lru_cache(maxsize=8)
def compile_teacher(model, mesh, settings: TeacherSettings, mask_id: int, num_classes: int) -> TeacherFns:
  """The jitted init and train step for a model / mesh / settings (cached: equal arguments
  reuse the compiled programs, e.g. when a run resumes in the same process)."""
  tx = settings.optimizer()
  init = _init_fn(model, tx)
  shardings = sharding.fsdp_shardings(jax.eval_shape(init, jnp.int32(0)), mesh)
  batch_shard = sharding.batch_sharding(mesh)
  step_fn = make_train_step(
      model, tx, mask_id=mask_id, num_classes=num_classes, label_dropout=settings.label_dropout,
      schedule=settings.mask_schedule, exact=settings.exact_mask, loss_on=settings.loss_on,
      label_smoothing=settings.label_smoothing, ema_decay=settings.ema_decay,
      lr_schedule=settings.schedule())
  step = jax.jit(step_fn, in_shardings=(shardings, batch_shard, batch_shard),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return TeacherFns(tx=tx, init=jax.jit(init, out_shardings=shardings), step=step,
                    state_shardings=shardings, batch_sharding=batch_shard)


def _global_batch(local, batch_shard):
  return jax.make_array_from_process_local_data(batch_shard, local)


# ---------------------------------------------------------------------------- loop setup
def _loop_setup(section, name: str, workdir: str, stop_after: Optional[int]):
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


def _checkpointer(section, name: str, workdir: str, steps: int):
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


# ---------------------------------------------------------------------------- mode=teacher
def train_teacher(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Trains a teacher MDM; checkpoints in ``<workdir>/checkpoints``, config in ``config.json``.

  Resumes from the latest checkpoint in ``workdir``. ``stop_after`` (or ``config.train.stop_after``)
  ends the loop after that many steps without a final checkpoint, as if the run were killed.
  Returns the final metrics: ``step``, ``train_loss`` (mean of the last logging window),
  ``val_loss`` and ``val_acc`` (EMA parameters, see ``evaluate_val_loss``; only when the run
  reached ``config.train.steps``) and ``val_loss_initial`` (before the first step, when
  ``eval_every`` > 0 and the run started from scratch).
  """
  from dimo_jax import data  # pylint: disable=import-outside-toplevel
  tc = config.train
  steps, stop_after, workdir = _loop_setup(tc, "train", workdir, stop_after)

  ds = data.load_dataset(config.data)
  info = dataset_info(ds)
  model = models.build_model(config.model, codebook_size=ds.vocab_size, seq_len=ds.seq_len,
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

  ckpt, start = _checkpointer(tc, "train", workdir, steps)
  writer = None
  try:
    # Batch k of the run is a pure function of (seed, k): a resumed run continues the stream.
    batches = data.batch_iterator(ds.train_tokens, ds.train_labels, batch_size // n_proc,
                                  int(tc.get("data_seed", config.seed)), shard_index=proc, num_shards=n_proc,
                                  start_step=start)

    settings = TeacherSettings.from_config(tc, steps)
    fns = compile_teacher(model, mesh, settings, mask_id, ds.num_classes)
    state = fns.init(jnp.int32(int(config.seed)))
    batch_shard = fns.batch_sharding
    if start:
      state = ckpt.restore(start, state)
      logging.info("Resumed from %s at step %d.", ckpt.directory, start)
    if proc == 0:
      cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
      checkpoints.write_config(workdir, dict(cfg, dataset=info))
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
                 type(model).__name__, models.count_params(state.params), ds.num_train, ds.num_val,
                 ds.seq_len, ds.vocab_size, ds.num_classes)

    final = {"step": start, "train_loss": float("nan")}
    history = []
    step = start
    t0 = time.time()
    if start == 0 and eval_every:
      val = validate()
      writer.write_scalars(0, {f"val/{k[4:]}": v for k, v in val.items()})
      final["val_loss_initial"] = val["val_loss"]
    with PreemptionGuard() as guard:
      while step < steps:
        tokens, labels = next(batches)
        if labels is None:
          labels = null_labels(tokens.shape[0], null_label)
        state, metrics = train_step(state, _global_batch(tokens, batch_shard), _global_batch(labels, batch_shard))
        step += 1
        history.append(metrics)
        progress(step)
        if step % log_every == 0 or step == steps:
          final["train_loss"] = log_window(history, step, writer, "train/")["loss"]
        ckpt.save(step, state, force=step == steps or guard.requested)
        if eval_every and step % eval_every == 0 and step != steps:
          writer.write_scalars(step, {f"val/{k[4:]}": v for k, v in validate().items()})
        if sample_every and step % sample_every == 0:
          write_samples(step)
        if guard.requested or (stop_after and step >= stop_after and step < steps):
          logging.info("Stopping at step %d.", step)
          break
    final["step"] = step
    if step == steps:
      ckpt.save(step, state, force=True)
      val = validate()
      writer.write_scalars(step, {f"val/{k[4:]}": v for k, v in val.items()})
      final.update(val)
      if sample_every and step % sample_every:
        write_samples(step)
    writer.flush()
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  logging.info("Teacher training finished at step %d after %.1fs: %s", step, time.time() - t0, final)
  return final


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


# ---------------------------------------------------------------------------- mode=distill
def _generator_grid(path, model, params, key, *, vocab_size, image_shape, r_init, sigma):
  from dimo_jax import data, distill  # pylint: disable=import-outside-toplevel
  labels = jnp.asarray(sample_label_grid(model.num_classes))
  tokens = host_array(distill.one_step_generate(model, params, key, labels, r_init=r_init, sigma=sigma))
  if jax.process_index() == 0:
    data.save_image_grid(data.tokens_to_images(tokens, vocab_size, image_shape), path,
                         ncols=model.num_classes if model.num_classes > 0 else None)


def train_distill(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """Di[M]O distillation (``mode=distill``) of ``config.teacher.checkpoint`` into a one-step
  generator. The whole state is checkpointed in ``<workdir>/checkpoints`` (a rerun resumes);
  the finished EMA generator is written to ``<workdir>/generator`` for ``mode=sample`` /
  ``mode=evaluate``. Returns the last logged metrics."""
  from dimo_jax import distill, sample  # pylint: disable=import-outside-toplevel
  dc = config.distill
  steps, stop_after, workdir = _loop_setup(dc, "distill", workdir, stop_after)

  teacher_path = config.teacher.checkpoint
  model, teacher_params, stored = sample.load_teacher(
      teacher_path, use_ema=bool(config.teacher.get("use_ema", True)),
      overrides=models.compute_overrides(config.model))
  info = stored.get("dataset") or {}
  image_shape = info.get("image_shape")
  mesh = sharding.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)))
  dist = distill.build_distiller(config, model)
  state = dist.init_state(teacher_params, int(config.seed))

  ckpt, start = _checkpointer(dc, "distill", workdir, steps)
  writer = None
  final = {}
  try:
    if start:
      state = ckpt.restore(start, state)
      logging.info("Resumed distillation from %s at step %d.", ckpt.directory, start)
    step_fn, state = dist.compile_step(state, mesh)  # stops here if the step cannot fit the device
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    stored_model = dict(stored.get("model", {}), **models.compute_overrides(config.model))
    run_config = dict(cfg, model=stored_model, dataset=info, role="distill")
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
                 type(model).__name__, models.count_params(teacher_params), teacher_path, steps,
                 dist.s.batch_size, mesh.size)
    history, step, t0 = [], start, time.time()
    with PreemptionGuard() as guard:
      while step < steps:
        state, metrics = step_fn(state)
        step += 1
        history.append(metrics)
        progress(step)
        if step % log_every == 0 or step == steps:
          final = log_window(history, step, writer)
        ckpt.save(step, state, force=step == steps or guard.requested)
        if image_shape and sample_every and (step % sample_every == 0 or step == steps):
          _generator_grid(os.path.join(workdir, "samples", f"generator_{step:07d}.png"), model, state.ema_params,
                          jax.random.fold_in(sample_key, step), **grid_kw)
        if guard.requested or (stop_after and step >= stop_after and step < steps):
          logging.info("Stopping at step %d.", step)
          break
    ckpt.wait()
    if step == steps:
      gen_config = dict(run_config, role="generator")
      checkpoints.save_params(distill.generator_dir(workdir), jax.device_get(state.gen.params), gen_config,
                              ema_params=jax.device_get(state.ema_params), step=step)
    writer.flush()
    final["step"] = step
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()
  logging.info("Distillation stopped at step %d after %.1fs: %s", step, time.time() - t0, final)
  if step == steps and dc.get("evaluate_at_end", False):
    from dimo_jax import evaluate  # pylint: disable=import-outside-toplevel
    results = evaluate.run_evaluate(config, workdir)
    table = evaluate.format_table(results)
    note = evaluate.ratio_note(results)
    table = table + ("\n\n" + note if note else "")
    if jax.process_index() == 0:
      print(table, flush=True)
    final["table"] = table
  return final


__all__ = [
    "PreemptionGuard", "train_distill", "log_window",
    "TrainState", "LR_SCHEDULES", "make_lr_schedule", "weight_decay_mask", "make_optimizer", "ema_update",
    "create_writer", "create_progress", "mean_metrics", "make_apply_fn", "dataset_info", "null_labels",
    "evaluate_val_loss", "sample_label_grid", "host_array", "write_sample_grid", "make_train_step", "init_train_state",
    "TeacherSettings", "TeacherFns", "compile_teacher", "train_teacher",
]
