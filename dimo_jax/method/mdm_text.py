"""The masked-diffusion teacher's objective for text-conditioned token networks
(``networks.text_conditioning.TextTokenModel``): the train step takes a condition pytree per
example (the caller draws prompts, including the empty prompt for guidance), masks with the
configured schedule, and fits the cross-entropy with ``method.mdm``'s optimiser and EMA.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dimo_jax.core import losses, masking, sharding
from dimo_jax.core.optim import ema_update
from dimo_jax.method.mdm import TeacherSettings, TrainState


def make_text_train_step(model, tx, settings: TeacherSettings) -> Callable:
  """Pure ``step(state, tokens [B, L], cond) -> (state, metrics)`` (randomness from the state's
  key folded with the step)."""
  s = settings

  def step(state: TrainState, tokens, cond):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    x_t, mask, _ = masking.forward_mask(key, tokens, model.mask_id, s.mask_schedule, exact=s.exact_mask)

    def loss_fn(params):
      logits = model.apply({"params": params}, x_t, cond)
      return losses.mdm_loss(logits, tokens, mask, loss_on=s.loss_on, label_smoothing=s.label_smoothing)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, s.ema_decay)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=s.schedule()(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

  return step


@dataclasses.dataclass(frozen=True)
class TextTeacherFns:
  tx: Any
  init: Callable  # seed -> TrainState (sharded)
  step: Callable  # (state, tokens, cond) -> (state, metrics); donates the state
  state_shardings: Any
  batch_sharding: Any


def compile_text_teacher(model, mesh, settings: TeacherSettings) -> TextTeacherFns:
  """The jitted init and train step: parameters and optimiser states over ``fsdp``, the batch
  (tokens and every condition leaf) over the batch axes."""
  tx = settings.optimizer()

  def init(seed):
    base = jax.random.key(seed)
    params = model.init_params(jax.random.fold_in(base, 0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      rng=jax.random.key_data(jax.random.fold_in(base, 1)))

  shardings = sharding.fsdp_shardings(jax.eval_shape(init, jnp.int32(0)), mesh)
  batch = sharding.batch_sharding(mesh)
  step = jax.jit(make_text_train_step(model, tx, settings), in_shardings=(shardings, batch, batch),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return TextTeacherFns(tx=tx, init=jax.jit(init, out_shardings=shardings), step=step,
                        state_shardings=shardings, batch_sharding=batch)
