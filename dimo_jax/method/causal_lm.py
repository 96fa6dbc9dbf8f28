"""The reference language model's objective: next-token cross-entropy, its pure train step and the
per-sequence negative log-likelihood the text metrics read.

A sequence ``x [L]`` is scored as ``-log p(x) = -sum_t log p(x_t | bos, x_<t)``: the model reads
``[bos, x_0, ..., x_{L-2}]`` (``shift_right``). The optimiser is the teacher's
(``method.mdm.TeacherSettings.optimizer``: AdamW, warm-up, cosine, clipping).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class LMState:
  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray  # raw key data


def shift_right(tokens, bos: int):
  """``[bos, x_0, ..., x_{L-2}]`` for every row of ``tokens [B, L]``."""
  tokens = jnp.asarray(tokens, jnp.int32)
  return jnp.concatenate([jnp.full(tokens.shape[:-1] + (1,), bos, jnp.int32), tokens[..., :-1]], axis=-1)


def token_nll(logits, tokens):
  """``-log softmax(logits)[token]`` per position (float32) for ``logits [B, L, V]``, ``tokens [B, L]``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, jnp.asarray(tokens, jnp.int32)[..., None], axis=-1)[..., 0]


def sequence_nll(apply_fn: Callable, params, tokens, bos: int):
  """``-log p(x)`` summed over the positions of every row of ``tokens [B, L]``: [B] float32.
  ``apply_fn(params, inputs [B, L]) -> logits [B, L, V]``."""
  return jnp.sum(token_nll(apply_fn(params, shift_right(tokens, bos)), tokens), axis=-1)


def init_state(model, tx, seed: int) -> LMState:
  base = jax.random.key(seed)
  params = model.init_params(jax.random.fold_in(base, 0))
  return LMState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                 rng=jax.random.key_data(jax.random.fold_in(base, 1)))


def make_train_step(model, tx, bos: int) -> Callable:
  """Pure ``step(state, tokens [B, L]) -> (state, {"loss": nats per token, "grad_norm"})``."""

  def step(state: LMState, tokens):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      logits = model.apply({"params": params}, shift_right(tokens, bos), deterministic=False,
                           rngs={"dropout": key})
      return jnp.mean(token_nll(logits, tokens))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return step
