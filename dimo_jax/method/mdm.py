"""The masked-diffusion teacher's objective: its train state, the pure train step (masking, label
dropout to the null class for guidance, cross-entropy, AdamW, EMA), its compiled and sharded
form, and the validation loss. ``pretrain_copy_mdm`` trains a small model on a known joint.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dimo_jax.core import losses, masking, sharding
from dimo_jax.core.optim import ema_update, make_lr_schedule, weight_decay_mask
from dimo_jax.networks import maskgit
from dimo_jax.networks.conditioning import null_labels


def pretrain_copy_mdm(model, key, steps: int, *, loss_on: str = "masked", lr: float = 3e-3, batch: int = 256):
  """An MDM trained on fresh samples of the copy pair (x, x) with Adam, as a student to start
  Di[M]O from. With ``loss_on='masked'`` it knows p(x_i | x_j) but not how to copy a visible
  token, so its one-step samples from x_init rarely agree."""
  import optax  # pylint: disable=import-outside-toplevel
  vocab = model.codebook_size
  tx = optax.adam(lr)
  params = maskgit.init_params(model, key)

  def step(carry, k):
    p, opt = carry
    k1, k2 = jax.random.split(k)
    x0 = jax.random.randint(k1, (batch,), 0, vocab)
    x0 = jnp.stack([x0, x0], 1)
    x_t, mask, _ = masking.forward_mask(k2, x0, vocab, "arccos")
    loss_fn = lambda q: losses.mdm_loss(model.apply({"params": q}, x_t, jnp.zeros((batch,), jnp.int32)),
                                        x0, mask, loss_on=loss_on)[0]
    updates, opt = tx.update(jax.grad(loss_fn)(p), opt, p)
    return (optax.apply_updates(p, updates), opt), None

  run = jax.jit(lambda p, ks: jax.lax.scan(step, (p, tx.init(p)), ks)[0][0])
  return run(params, jax.random.split(jax.random.fold_in(key, 1), steps))


@flax.struct.dataclass
class TrainState:
  """Teacher training state. ``rng`` holds raw key data (``jax.random.key_data``)."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jnp.ndarray


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
  accuracy on masked tokens; ``val_loss_se``: the loss's standard error from the spread of the
  per-batch losses; ``val_batches``: the per-batch losses and their token weights (lists, for
  ``Plateau``'s paired comparison). ``labels`` None means unconditional (the null class).
  """
  tokens = np.asarray(tokens, np.int32)
  n = tokens.shape[0]
  if n == 0:
    return {"val_loss": float("nan"), "val_acc": float("nan"), "val_loss_se": float("nan")}
  labels = null_labels(n, null_label) if labels is None else np.asarray(labels, np.int32)
  batch_size = int(min(batch_size, n))
  totals, per_batch = None, []
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
    per_batch.append((out["loss_sum"], out["weight"]))
  totals = jax.device_get(totals)
  sums, weights = (np.asarray(x, np.float64) for x in zip(*jax.device_get(per_batch)))
  return {"val_loss": float(totals["loss_sum"] / max(totals["weight"], 1.0)),
          "val_acc": float(totals["correct"] / max(totals["masked"], 1.0)),
          "val_loss_se": standard_error(sums / np.maximum(weights, 1e-12), weights),
          "val_batches": ((sums / np.maximum(weights, 1e-12)).tolist(), weights.tolist())}


def standard_error(values: np.ndarray, weights: np.ndarray) -> float:
  """Standard error of the weighted mean of per-batch ``values`` (weighted by ``weights``, e.g.
  the tokens each batch scores) from their spread; 0 with fewer than two weighted batches."""
  values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
  keep = weights > 0
  values, weights = values[keep], weights[keep]
  if len(weights) < 2:
    return 0.0
  w = weights / weights.sum()
  var = np.sum(w * (values - np.sum(w * values)) ** 2) * len(w) / (len(w) - 1)
  return float(np.sqrt(var * np.sum(w ** 2)))


# ---------------------------------------------------------------------------- early stopping
@dataclasses.dataclass
class Plateau:
  """Stops training when the validation loss stops improving.

  Two rules. The noise rule (``window`` > 0): after each evaluation, the best of the last
  ``window`` evaluations is compared with the best before them; when its gain is not more than
  ``k`` standard errors, training stops, and a curve that keeps gaining more than its noise runs
  on. With the per-batch losses of each evaluation (``batches``: values and weights, the same
  masked batches every time, as ``evaluate_val_loss`` scores them) the gain and its standard error
  are those of the paired per-batch differences; without them, ``se`` (the evaluation's own
  standard error) is the noise. The relative rule (``patience`` > 0, ``window`` 0): ``patience``
  evaluations without a loss below ``best * (1 - min_delta)`` stop it. Both 0: never stops.
  ``update`` returns whether the loss is the best so far (the caller keeps those parameters).
  """
  patience: int = 0
  min_delta: float = 1e-3
  window: int = 0
  k: float = 2.0
  best: float = float("inf")
  best_step: int = -1
  waited: int = 0
  history: list = dataclasses.field(default_factory=list)  # (loss, se, batch values, batch weights)
  gain: float = float("nan")
  noise: float = float("nan")

  def update(self, step: int, loss: float, se: float = 0.0, batches=None) -> bool:
    loss = float(loss)
    values, weights = (None, None) if batches is None else (np.asarray(b, np.float64) for b in batches)
    self.history.append((loss if np.isfinite(loss) else float("inf"), float(se) if np.isfinite(se) else 0.0,
                         values, weights))
    if self.window > 0:
      if np.isfinite(loss) and loss < self.best:
        self.best, self.best_step = loss, int(step)
        return True
      return False
    if np.isfinite(loss) and (not np.isfinite(self.best) or loss < self.best * (1.0 - self.min_delta)):
      self.best, self.best_step, self.waited = loss, int(step), 0
      return True
    self.waited += 1
    return False

  @property
  def stop(self) -> bool:
    if self.window <= 0:
      return self.patience > 0 and self.waited >= self.patience
    if len(self.history) <= self.window:
      return False
    losses = [h[0] for h in self.history]
    split = len(losses) - self.window
    e = int(np.argmin(losses[:split]))
    r = split + int(np.argmin(losses[split:]))
    if not np.isfinite(losses[e]):
      return False
    _, se_r, values_r, weights = self.history[r]
    values_e = self.history[e][2]
    if values_r is not None and values_e is not None and values_r.shape == values_e.shape:
      diff = values_e - values_r
      w = weights / max(weights.sum(), 1e-12)
      self.gain, self.noise = float(np.sum(w * diff)), standard_error(diff, weights)
    else:
      self.gain, self.noise = losses[e] - losses[r], se_r
    return not self.gain > self.k * self.noise

  def reason(self) -> str:
    """Why it stopped, for the log."""
    if self.window > 0:
      return (f"the best of the last {self.window} evaluations gained {self.gain:.5f} on the earlier best, not more "
              f"than {self.k:g} standard errors ({self.k * self.noise:.5f})")
    return f"validation loss not improved by {self.min_delta:g} for {self.patience} evaluations"


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
    params = maskgit.init_params(model, jax.random.fold_in(base, 0))
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


# ---------------------------------------------------------------------------- the bound on sequences
@functools.partial(jax.jit, static_argnames=("apply_fn", "mask_id", "draws"))
def _nll_batch(apply_fn, params, tokens, labels, key, *, mask_id, draws):
  n, seq_len = tokens.shape

  def one(k):
    k_num, k_order = jax.random.split(k)
    num = jax.random.randint(k_num, (n, 1), 1, seq_len + 1)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_order, (n, seq_len)), axis=1), axis=1)
    mask = rank < num
    logits = apply_fn(params, jnp.where(mask, mask_id, tokens), labels)
    logp = jax.nn.log_softmax(logits[..., :mask_id].astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(ce * mask, axis=1) / num[:, 0]

  return jnp.mean(jax.vmap(one)(jax.random.split(key, draws)), axis=0)


def nll_bound(apply_fn, params, tokens, labels=None, *, mask_id: int, null_label: int = 0, key=None,
              batch_size: int = 256, draws: int = 4) -> np.ndarray:
  """The masked-diffusion (any-order) bound on -log p(x) / L for each sequence, in nats per token.

  -log p(x) <= L * E_{k ~ U{1..L}} E_{k positions masked} [(1/k) sum_masked -log p(x_i | visible)]
  (the bound a masked diffusion model is trained on, with the masking schedule integrated out);
  estimated with ``draws`` draws of (k, positions) per sequence. Returns [N] float64.
  """
  tokens = np.asarray(tokens, np.int32)
  n = tokens.shape[0]
  if n == 0:
    return np.zeros((0,), np.float64)
  labels = null_labels(n, null_label) if labels is None else np.asarray(labels, np.int32)
  key = jax.random.key(0) if key is None else key
  batch_size = int(min(batch_size, n))
  out = []
  for i, start in enumerate(range(0, n, batch_size)):
    tok, lab = tokens[start:start + batch_size], labels[start:start + batch_size]
    m = tok.shape[0]
    if m < batch_size:
      tok = np.concatenate([tok, np.repeat(tok[-1:], batch_size - m, axis=0)])
      lab = np.concatenate([lab, np.repeat(lab[-1:], batch_size - m, axis=0)])
    res = _nll_batch(apply_fn, params, tok, lab, jax.random.fold_in(key, i), mask_id=int(mask_id),
                     draws=int(draws))
    out.append(np.asarray(jax.device_get(res), np.float64)[:m])
  return np.concatenate(out)
