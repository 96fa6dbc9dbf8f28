"""Di[M]O: the three-model distillation state and its update step.

Teacher phi (frozen), one-step generator theta and auxiliary psi (which tracks the generator's
own conditionals) all start from the teacher's weights. One step is one generator update and
``aux_updates`` auxiliary updates, each on a fresh batch drawn inside the step:

generator: x_init (random codes, round(L r_init) masks) -> z = f_theta(x_init) through
``jax.vjp`` -> x_theta ~ softmax(z / T) -> x_t = exact-count forward masking of x_theta ->
teacher (with guidance) and auxiliary logits at x_t -> closed-form token gradient g of D(p||q),
zero where x_t is not masked -> ONE vjp with cotangent g / normaliser -> optax update.

auxiliary: fresh x_init -> x_theta from the (updated) generator -> fresh masking ->
cross-entropy of psi against x_theta at the masked positions (label smoothing) -> optax update.

Conditions: class labels drawn uniformly inside the step (the default), or, with ``cond_spec``
(text-to-image), a condition pytree per example fed to the step from a condition source
(``step(state, conds)``, ``conds = {"gen": [B, ...], "aux": [aux_updates, B, ...], "neg": [1, ...]}``):
the generator update's batch, one fresh batch per auxiliary update and the negative prompt's
condition, against which the teacher (weight ``guidance``) and the auxiliary (``aux_guidance``)
are guided in one batched call ``[prompt; negative]``.

k generator steps (``generator_steps``, 1 by default; ``core.generator_steps``): step j reads the
previous step's output re-masked to level t_j of ``generator_schedule``. Training simulates
backward (as DMD2 does): each example draws a step j uniformly, its input comes from running the
current generator's steps 0..j-1 (no gradient), and the loss above applies to step j's output;
the auxiliary's batches draw from the same mixture of steps (docs/proofs.md, "A few-step
generator").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from dimo_jax.core import divergences, masking, sharding
from dimo_jax.core import generator_steps as gen_steps
from dimo_jax.core.losses import aux_loss
from dimo_jax.core.memory import check_fits, device_bytes_limit
from dimo_jax.core.optim import ema_update, frozen_mask, make_optimizer
from dimo_jax.core.samplers import filter_logits, sample_categorical

TrainState = train_state.TrainState


def zero_nonfinite(tree):
  """``tree`` with every NaN / inf entry set to zero, and how many entries were (int32)."""
  leaves = jax.tree_util.tree_leaves(tree)
  count = sum((jnp.sum(~jnp.isfinite(a)).astype(jnp.int32) for a in leaves), jnp.int32(0))
  return jax.tree_util.tree_map(lambda a: jnp.where(jnp.isfinite(a), a, jnp.zeros_like(a)), tree), count


@struct.dataclass
class DistillState:
  step: jax.Array
  teacher_params: Any
  gen: TrainState
  aux: TrainState
  ema_params: Any
  rng: jax.Array  # raw uint32 key data (checkpoint friendly)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The options of one Di[M]O run (read from ``config.distill`` and ``config.teacher``)."""
  batch_size: int = 64
  r_init: Any = "fix_0.6"
  sigma: float = 0.1
  sigma_warmup_steps: int = 0
  gen_temp: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  mask_schedule: str = "arccos"
  divergence: str = "fkl"
  beta: float = 0.0
  normalization: str = "batch"
  dmd_weight: bool = False
  grad_input: str = "init"
  guidance: float = 1.0
  guidance_schedule: str = "constant"
  aux_guidance: float = 1.0
  aux_updates: int = 1
  aux_label_smoothing: float = 0.1
  aux_soft_target: bool = False
  smooth_teacher: bool = False
  teacher_dropout: bool = False
  gen_dropout: bool = False
  aux_dropout: bool = False
  ema_decay: float = 0.9999
  generator_steps: int = 1
  generator_schedule: Any = "linear"

  def __post_init__(self):
    checks = {
        "normalization": (self.normalization, ("batch", "masked")),
        "grad_input": (self.grad_input, ("init", "sample")),
        "guidance_schedule": (self.guidance_schedule, ("constant", "linear")),
        "mask_schedule": (self.mask_schedule, masking.SCHEDULES),
        "divergence": (self.divergence, (*divergences.PER_TOKEN, "jeffreys")),
    }
    for key, (value, allowed) in checks.items():
      if value not in allowed:
        raise ValueError(f"config.distill.{key}={value!r} is not valid; choose one of {list(allowed)}")
    if self.aux_updates < 1:
      raise ValueError(f"config.distill.aux_updates must be >= 1, got {self.aux_updates}")
    masking.parse_r_init(self.r_init)
    if not isinstance(self.generator_schedule, str):
      object.__setattr__(self, "generator_schedule", tuple(self.generator_schedule))
    gen_steps.check_schedule(self.generator_schedule, self.generator_steps, "config.distill.")

  @classmethod
  def from_config(cls, config) -> "DistillSettings":
    d, t = config.distill, config.teacher
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: d[k] for k in d.keys() if k in names}
    kwargs["guidance"] = float(t.get("guidance", 1.0))
    kwargs["guidance_schedule"] = t.get("guidance_schedule", "constant")
    return cls(**kwargs)


class Distiller:
  """Holds the static parts of a run (networks, settings, optimizers) and builds the pure step.

  ``model`` is the generator's and auxiliary's architecture, also the teacher's unless
  ``teacher_model`` (any module with the same calling convention) is given. Labels are drawn
  uniformly over ``model.num_classes`` classes; an unconditional teacher (0 classes) always
  gets the null label. With ``cond_spec`` (a pytree of ``jax.ShapeDtypeStruct`` of ONE
  example's condition, e.g. ``{"text": (T, D), "pooled": (P,), ...}``) the conditions come from
  the caller instead (see the module docstring); the networks are then called with the
  condition pytree in place of the labels (``networks.text_conditioning``).
  """

  def __init__(self, model, settings: DistillSettings, gen_tx, aux_tx, teacher_model=None, cond_spec=None):
    self.model = model
    self.s = settings
    self.gen_tx = gen_tx
    self.aux_tx = aux_tx
    self.r_init_fn = masking.parse_r_init(settings.r_init)
    self.codebook = model.codebook_size
    self.seq_len = model.seq_len
    self.num_classes = model.num_classes
    self.mask_id = int(getattr(model, "mask_id", self.codebook))
    self.cond_spec = cond_spec
    teacher_model = model if teacher_model is None else teacher_model
    if settings.guidance != 1.0 and not teacher_model.has_null_class:
      raise ValueError(
          f"config.teacher.guidance={settings.guidance} needs a null class, which the "
          f"{type(teacher_model).__name__} "
          "architecture lacks; set --config.teacher.guidance=1.0")
    if settings.aux_guidance != 1.0 and not model.has_null_class:
      raise ValueError(f"config.distill.aux_guidance={settings.aux_guidance} needs a null class, which the "
                       f"{type(model).__name__} architecture lacks; set --config.distill.aux_guidance=1.0")
    with_dropout = lambda m, on: m.clone(dropout=float(m.dropout if on else 0.0))  # parameters unchanged
    self.teacher_model = with_dropout(teacher_model, settings.teacher_dropout)
    self.gen_model = with_dropout(model, settings.gen_dropout)
    self.aux_model = with_dropout(model, settings.aux_dropout)
    self.batch_sharding = None  # set by ``jit_step`` when a mesh is given
    self.cond_shardings = None  # set by ``jit_step`` with ``cond_spec``

  # ------------------------------------------------------------------ state
  def init_state(self, teacher_params, seed: int, student_params=None) -> DistillState:
    """Generator, auxiliary and EMA start from ``student_params`` (default: the teacher's)."""
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)
    student_params = teacher_params if student_params is None else student_params
    gen = TrainState.create(apply_fn=self.gen_model.apply, params=copy(student_params), tx=self.gen_tx)
    aux = TrainState.create(apply_fn=self.aux_model.apply, params=copy(student_params), tx=self.aux_tx)
    return DistillState(step=jnp.zeros((), jnp.int32), teacher_params=copy(teacher_params), gen=gen, aux=aux,
                        ema_params=copy(student_params),
                        rng=jax.random.key_data(jax.random.key(seed)))

  # ------------------------------------------------------------------ pieces
  def sigma_at(self, step):
    s = self.s
    if s.sigma_warmup_steps > 0:
      return jnp.float32(s.sigma) * jnp.minimum(1.0, step.astype(jnp.float32) / s.sigma_warmup_steps)
    return s.sigma

  def draw_inputs(self, key, batch: int, cond=None):
    """Labels (or the given condition pytree ``cond``) and x_init for one batch."""
    k_lab, k_r, k_x = jax.random.split(key, 3)
    if cond is not None:
      labels = cond
    elif self.num_classes > 0:
      labels = jax.random.randint(k_lab, (batch,), 0, self.num_classes, jnp.int32)
    else:
      labels = jnp.zeros((batch,), jnp.int32)
    r_init = self.r_init_fn(k_r)
    x_init = masking.make_x_init(k_x, batch, self.seq_len, self.codebook, r_init)
    if self.mask_id != self.codebook:  # a mask id above the codebook's end (Meissonic: vocab - 1)
      x_init = jnp.where(x_init == self.codebook, self.mask_id, x_init)
    if self.batch_sharding is not None:
      labels = jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, self.batch_sharding), labels)
      x_init = jax.lax.with_sharding_constraint(x_init, self.batch_sharding)
    return labels, x_init

  def gen_logits(self, params, x, labels, key, sigma):
    k_drop, k_noise = jax.random.split(key)
    return self.gen_model.apply({"params": params}, x, labels, deterministic=not self.s.gen_dropout,
                                noise_sigma=sigma, rngs={"dropout": k_drop, "noise": k_noise})

  def sample_tokens(self, key, logits):
    s = self.s
    z = filter_logits(logits[..., : self.codebook], s.gen_temp, s.top_k, s.top_p)
    return sample_categorical(key, z)

  def _guided(self, apply, x_t, labels, neg, weight: float, ratio=None, schedule: str = "constant"):
    """``u + w (c - u)``: the conditional and the negative branch (the null class, or the
    negative prompt's condition ``neg`` with a leading batch of 1) in one batched call."""
    if weight == 1.0 and schedule == "constant":
      return apply(x_t, labels)
    batch = x_t.shape[0]
    if neg is None:
      neg = jnp.full_like(labels, self.num_classes)
    else:
      neg = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:])), neg)
    both_labels = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u.astype(c.dtype)]), labels, neg)
    both = apply(jnp.concatenate([x_t, x_t]), both_labels)
    cond, uncond = both[:batch], both[batch:]
    w = jnp.float32(weight)
    if schedule == "linear":  # the sampler's ramp read off the mask ratio: w (1 - r)
      w = w * (1.0 - ratio)[:, None, None]
    return uncond + w * (cond - uncond)

  def teacher_logits(self, params, x_t, labels, ratio, key, neg=None):
    """Teacher logits with classifier-free guidance (against the null class, or the negative
    prompt's condition ``neg``); both branches in one batched call."""
    s = self.s
    apply = lambda xx, ll: self.teacher_model.apply(
        {"params": params}, xx, ll, deterministic=not s.teacher_dropout, rngs={"dropout": key})
    return self._guided(apply, x_t, labels, neg, s.guidance, ratio, s.guidance_schedule)

  def aux_logits(self, params, x_t, labels, key, neg=None):
    """Auxiliary logits, guided with ``aux_guidance`` (1: the conditional call alone)."""
    apply = lambda xx, ll: self.aux_model.apply({"params": params}, xx, ll, deterministic=not self.s.aux_dropout,
                                                rngs={"dropout": key})
    return self._guided(apply, x_t, labels, neg, self.s.aux_guidance)

  def smoothed_teacher_logits(self, t_logits):
    """log((1 - eps) p + eps u) with u uniform over the codes: the distribution an auxiliary
    trained with label smoothing eps reaches when the generator equals the teacher."""
    eps = self.s.aux_label_smoothing
    p = jax.nn.softmax(t_logits.astype(jnp.float32), -1)
    uniform = (jnp.arange(p.shape[-1]) < self.codebook).astype(jnp.float32) / self.codebook
    return jnp.log((1.0 - eps) * p + eps * uniform)

  def cotangent(self, t_logits, a_logits, mask):
    """Token gradient g (zero outside ``mask``, NaN-free) scaled by the configured normaliser.

    With ``smooth_teacher`` the teacher's distribution is smoothed like the auxiliary's targets,
    so that g vanishes when the generator matches the teacher (the authors' code does not)."""
    s = self.s
    if s.smooth_teacher and s.aux_label_smoothing > 0:
      t_logits = self.smoothed_teacher_logits(t_logits)
    g = divergences.token_gradient(s.divergence, t_logits, a_logits, s.beta)
    g = jnp.where(mask[..., None], g, 0.0)
    nan_count = jnp.sum(~jnp.isfinite(g))
    g = jnp.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    batch = g.shape[0]
    n_masked = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.float32), 1.0)
    if s.normalization == "batch":
      scale = jnp.full((batch,), 1.0 / batch)
    else:
      scale = 1.0 / (batch * n_masked)
    if s.dmd_weight:
      # DMD-style weight: the inverse of the mean L1 gap between teacher and auxiliary over the
      # masked tokens of each sample (a stop-gradient normaliser).
      p = jax.nn.softmax(t_logits.astype(jnp.float32), -1)
      q = jax.nn.softmax(a_logits.astype(jnp.float32), -1)
      gap = jnp.sum(jnp.where(mask, jnp.sum(jnp.abs(p - q), -1), 0.0), 1) / n_masked
      scale = scale / jnp.maximum(gap, 1e-6)
    return g * scale[:, None, None], nan_count

  # ------------------------------------------------------------------ updates
  def simulate_inputs(self, params, x_init, labels, key, sigma):
    """Backward simulation of the k-step generator: per example a step j drawn uniformly from
    [0, k) and its input, made by running steps 0..j-1 of the generator ``params`` from
    ``x_init`` (no gradient: the steps draw tokens). Returns ``(inputs, j)``; step 0's input is
    ``x_init`` itself. The re-masking levels follow ``generator_schedule`` from each example's own
    mask ratio in ``x_init``."""
    s = self.s
    k_sel, k_noise, k_draw, k_chain = jax.random.split(key, 4)
    select = jax.random.randint(k_sel, (x_init.shape[0],), 0, s.generator_steps, jnp.int32)
    params = jax.lax.stop_gradient(params)
    step_fn = lambda x, kn, kd: self.sample_tokens(kd, self.gen_logits(params, x, labels, kn, sigma))
    r0 = jnp.mean((x_init == self.mask_id).astype(jnp.float32), axis=1)
    ratios = gen_steps.step_ratios(s.generator_schedule, s.generator_steps, r0)
    _, inputs = gen_steps.chain(step_fn, x_init, (k_noise, k_draw), k_chain, ratios, self.mask_id, select)
    return inputs, select

  def generator_inputs(self, params, key, sim_key, sigma, cond=None):
    """``(labels, x_init, inputs)`` of one generator batch: ``inputs`` is x_init for the one-step
    generator, otherwise the drawn steps' inputs (``simulate_inputs`` with ``sim_key``)."""
    labels, x_init = self.draw_inputs(key, self.s.batch_size, cond)
    if self.s.generator_steps == 1:
      return labels, x_init, x_init
    return labels, x_init, self.simulate_inputs(params, x_init, labels, sim_key, sigma)[0]

  def generator_gradient(self, state: DistillState, key, cond=None, neg=None):
    """The Di[M]O gradient of one batch: ``(grads, z, parts)`` with the generator's logits ``z`` at
    its inputs and ``parts`` (``inputs``, ``x_theta``, ``x_t``, ``mask``, ``ratio``, ``t_logits``,
    ``a_logits``, ``g``: the scaled cotangent, ``nan_count``). With k generator steps the loss
    applies to the output of each example's drawn step; its input is a constant."""
    s = self.s
    keys = jax.random.split(key, 7)
    sigma = self.sigma_at(state.step)
    labels, x_init, inputs = self.generator_inputs(state.gen.params, keys[0], keys[6], sigma, cond)
    fwd = lambda p, x: self.gen_logits(p, x, labels, keys[1], sigma)
    z, vjp_fn = jax.vjp(lambda p: fwd(p, inputs), state.gen.params)
    x_theta = self.sample_tokens(keys[2], z)
    x_t, mask, ratio = masking.forward_mask(keys[3], x_theta, self.mask_id, s.mask_schedule, exact=True)
    t_logits = self.teacher_logits(state.teacher_params, x_t, labels, ratio, keys[4], neg)
    a_logits = self.aux_logits(state.aux.params, x_t, labels, keys[5], neg)
    g, nan_count = self.cotangent(t_logits, a_logits, mask)
    if s.grad_input == "sample":
      # The paper's alternative: the Jacobian at the generated sample with the input's mask re-applied.
      x_alt = jnp.where(inputs == self.mask_id, inputs, x_theta)
      _, vjp_fn = jax.vjp(lambda p: fwd(p, x_alt), state.gen.params)
    (grads,) = vjp_fn(g.astype(z.dtype))
    parts = dict(inputs=inputs, x_theta=x_theta, x_t=x_t, mask=mask, ratio=ratio, t_logits=t_logits,
                 a_logits=a_logits, g=g, nan_count=nan_count)
    return grads, z, parts

  def generator_update(self, state: DistillState, key, cond=None, neg=None):
    s = self.s
    grads, z, parts = self.generator_gradient(state, key, cond, neg)
    mask, g, nan_count = parts["mask"], parts["g"], parts["nan_count"]
    grads, grad_nonfinite = zero_nonfinite(grads)
    gen = state.gen.apply_gradients(grads=grads)

    # The logged divergence sees what the gradient sees: masked positions only, non-finite
    # values zeroed (the normaliser still counts every masked position).
    tok_div = divergences.divergence(s.divergence, parts["t_logits"], parts["a_logits"], s.beta)
    tok_div = jnp.where(mask & jnp.isfinite(tok_div), tok_div, 0.0)
    n_masked = jnp.maximum(jnp.sum(mask), 1)
    metrics = {
        "gen/surrogate_loss": 0.5 * jnp.sum(jnp.square(g)) * s.batch_size,
        "gen/grad_norm": optax.tree.norm(grads),
        "gen/token_divergence": jnp.sum(tok_div) / n_masked,
        "gen/entropy": jnp.mean(divergences.entropy(z[..., : self.codebook])),
        "gen/nan_count": nan_count.astype(jnp.float32),
        "gen/mask_ratio": jnp.mean(parts["ratio"]),
        "nonfinite": (nan_count.astype(jnp.int32) + grad_nonfinite).astype(jnp.float32),
    }
    return gen, metrics

  def auxiliary_update(self, aux: TrainState, gen_params, step, key, cond=None, neg=None):
    s = self.s
    keys = jax.random.split(key, 5)
    sigma = self.sigma_at(step)
    # The auxiliary tracks the mixture of every step's outputs: the same draw of steps as the generator's.
    labels, _, inputs = self.generator_inputs(gen_params, keys[0], jax.random.fold_in(keys[0], 1), sigma, cond)
    z = jax.lax.stop_gradient(self.gen_logits(gen_params, inputs, labels, keys[1], sigma))
    x_theta = self.sample_tokens(keys[2], z)
    x_t, mask, _ = masking.forward_mask(keys[3], x_theta, self.mask_id, s.mask_schedule, exact=True)
    soft = None
    if s.aux_soft_target:
      soft = jax.nn.softmax(filter_logits(z[..., : self.codebook], s.gen_temp, s.top_k, s.top_p), -1)

    def loss_fn(p):
      logits = self.aux_logits(p, x_t, labels, keys[4], neg)
      return aux_loss(logits, x_theta, mask, s.aux_label_smoothing, soft)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(aux.params)
    grads, nonfinite = zero_nonfinite(grads)
    aux = aux.apply_gradients(grads=grads)
    return aux, {"aux/loss": loss, "aux/grad_norm": optax.tree.norm(grads),
                 "aux/nonfinite": nonfinite.astype(jnp.float32)}

  def step(self, state: DistillState, conds=None):
    """One Di[M]O iteration: generator update, then the auxiliary update(s), then the EMA.
    ``conds``: the step's conditions when the Distiller has a ``cond_spec`` (module docstring).

    Metrics: the generator's (``gen/...``), the last auxiliary update's (``aux/loss``,
    ``aux/grad_norm``) and ``nonfinite``: how many NaN / inf entries the guards zeroed in this
    step (token gradient at masked positions, generator and auxiliary parameter gradients);
    0 on a healthy step. Every metric stays finite while the guards hold the networks finite."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_gen, k_aux = jax.random.split(key)
    if (conds is None) != (self.cond_spec is None):
      raise ValueError("the step takes conditions exactly when the Distiller has a cond_spec")
    conds = conds or {}
    neg = conds.get("neg")
    gen, metrics = self.generator_update(state, k_gen, conds.get("gen"), neg)

    def body(i, carry):
      aux, prev = carry
      cond = None
      if "aux" in conds:
        cond = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), conds["aux"])
      aux, m = self.auxiliary_update(aux, gen.params, state.step, jax.random.fold_in(k_aux, i), cond, neg)
      return aux, {**m, "aux/nonfinite": prev["aux/nonfinite"] + m["aux/nonfinite"]}

    aux_metrics0 = {"aux/loss": jnp.float32(0), "aux/grad_norm": jnp.float32(0), "aux/nonfinite": jnp.float32(0)}
    aux, aux_metrics = jax.lax.fori_loop(0, self.s.aux_updates, body, (state.aux, aux_metrics0))
    metrics["nonfinite"] = metrics["nonfinite"] + aux_metrics.pop("aux/nonfinite")
    ema = ema_update(state.ema_params, gen.params, state.step, self.s.ema_decay)
    new_state = state.replace(step=state.step + 1, gen=gen, aux=aux, ema_params=ema)
    return new_state, {**metrics, **aux_metrics}

  def jit_step(self, state: DistillState, mesh=None, min_shard_size: int = 2**14):
    """The compiled step and the state placed for it. With a mesh: the batch over
    ('data', 'fsdp'), parameters and optimizer states over 'fsdp', the state donated."""
    fn, shardings = self._jit(state, mesh, min_shard_size)
    return fn, jax.device_put(state, shardings)

  def _jit(self, state, mesh=None, min_shard_size: int = 2**14):
    """``(jitted step, state shardings)`` for a state or its shapes."""
    if mesh is None:  # one device; explicit shardings keep the compiled program stable across steps
      mesh = sharding.make_mesh(devices=jax.devices()[:1])
    sharding.check_batch(self.s.batch_size, mesh, "config.distill.batch_size")
    self.batch_sharding = sharding.batch_sharding(mesh)
    shardings = sharding.fsdp_shardings(state, mesh, min_shard_size)
    in_shardings = (shardings,)
    if self.cond_spec is not None:
      self.cond_shardings = self._cond_shardings(mesh)
      in_shardings = (shardings, self.cond_shardings)
    fn = jax.jit(self.step, in_shardings=in_shardings, out_shardings=(shardings, sharding.replicated(mesh)),
                 donate_argnums=0)
    return fn, shardings

  def check_fits_abstract(self, state_shapes, mesh=None, bytes_limit: Optional[int] = -1,
                          min_shard_size: int = 2**14) -> Optional[int]:
    """Compiles the step for the SHAPES of a state (``jax.eval_shape`` of ``init_state``: nothing
    is allocated) and raises, naming XLA's estimate and the remedies, when it cannot fit the
    device; returns the estimate in bytes (None where the backend gives none)."""
    return self.compile_abstract(state_shapes, mesh, bytes_limit, min_shard_size)[2]

  def compile_abstract(self, state_shapes, mesh=None, bytes_limit: Optional[int] = -1,
                       min_shard_size: int = 2**14):
    """``check_fits_abstract`` that also returns what it compiled: ``(compiled step, the state's
    shardings, XLA's estimate)``; place the real state with ``jax.device_put(state, shardings)``."""
    fn, shardings = self._jit(state_shapes, mesh, min_shard_size)
    args = (state_shapes,) if self.cond_spec is None else (state_shapes, self.abstract_conditions())
    compiled = fn.lower(*args).compile()
    return compiled, shardings, check_fits(compiled, device_bytes_limit() if bytes_limit == -1 else bytes_limit)

  def _cond_shardings(self, mesh):
    """The step's conditions: ``gen`` over the batch axes, ``aux`` over them on axis 1, ``neg``
    replicated."""
    axes = sharding.batch_sharding(mesh).spec[0]
    spec = lambda lead: jax.tree_util.tree_map(
        lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*lead)), self.cond_spec)
    return {"gen": spec((axes,)), "aux": spec((None, axes)), "neg": spec(())}

  def abstract_conditions(self):
    """``jax.ShapeDtypeStruct``s of one step's ``conds`` (for ahead-of-time compilation)."""
    b, a = self.s.batch_size, self.s.aux_updates
    shaped = lambda lead: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype),
                                                 self.cond_spec)
    return {"gen": shaped((b,)), "aux": shaped((a, b)), "neg": shaped((1,))}

  def place_conditions(self, conds):
    """Host conditions on the devices as the compiled step expects them (after ``jit_step``)."""
    if self.cond_shardings is None:
      return conds
    return jax.tree_util.tree_map(lambda x, sh: jax.device_put(jnp.asarray(x), sh), conds, self.cond_shardings)

  def compile_step(self, state: DistillState, mesh=None, bytes_limit: Optional[int] = -1):
    """``jit_step`` compiled ahead of time, after checking that it fits: raises before anything
    large is allocated when XLA's estimate of the step exceeds ``bytes_limit`` (default: what the
    first local device reports; the CPU reports nothing and is not checked)."""
    fn, state = self.jit_step(state, mesh)
    args = (state,) if self.cond_spec is None else (state, self.abstract_conditions())
    compiled = fn.lower(*args).compile()
    check_fits(compiled, device_bytes_limit() if bytes_limit == -1 else bytes_limit)
    return compiled, state


def build_distiller(config, model, teacher_model=None, cond_spec=None, init_fn=None) -> Distiller:
  """A ``Distiller`` from a full config (``config.distill``, ``config.teacher``) and the model
  (``cond_spec``: see ``Distiller``). ``init_fn(key)`` gives the model's parameters (default
  ``model.init_params``); only their shapes are used, for the frozen groups."""
  settings = DistillSettings.from_config(config)
  d = config.distill
  init = init_fn or model.init_params
  shapes = jax.eval_shape(lambda: init(jax.random.key(0)))
  frozen = frozen_mask(shapes, tuple(d.get("freeze", ())))
  gen_tx = make_optimizer(d.gen_lr, warmup_steps=d.warmup_steps, b1=d.b1, b2=d.b2, eps=d.eps,
                          grad_clip=d.gen_grad_clip, frozen=frozen,
                          schedule_kind=d.get("gen_lr_schedule", "constant"), steps=d.get("steps", 0))
  aux_tx = make_optimizer(d.aux_lr, warmup_steps=d.warmup_steps, b1=d.b1, b2=d.b2, eps=d.eps,
                          grad_clip=d.get("aux_grad_clip", 0.0), frozen=frozen)
  return Distiller(model, settings, gen_tx, aux_tx, teacher_model=teacher_model, cond_spec=cond_spec)
