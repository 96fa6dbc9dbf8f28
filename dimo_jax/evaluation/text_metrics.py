"""How text samples are judged: generative perplexity under a reference LM, unigram entropy,
distinct and repeated n-grams.

- Generative perplexity: ``exp`` of the mean negative log-likelihood per token of the samples under
  a causal reference LM (``networks.causal_lm``) trained on the training split apart from the
  teacher (``train_reference_lm``); the same number on real held-out text is the floor a model
  can hope for. Low entropy fakes low perplexity (repetitive text is likely), so it is always
  read beside the entropy.
- Unigram entropy: the entropy (nats) of the token frequencies within each sample, averaged over
  samples (as MDLM and SDTT report it).
- Distinct-n: distinct n-grams over all n-grams of the set (n = 1..4).
- Repeated n-grams: per sample, the fraction of its n-grams that already occurred earlier in it.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.data.batching import batch_iterator
from dimo_jax.method import causal_lm
from dimo_jax.method.mdm import TeacherSettings


# ---------------------------------------------------------------------------- counts
def unigram_entropy(samples) -> np.ndarray:
  """Per sample ``-sum_v f_v log f_v`` (nats) of its token frequencies ``f``: [N] float64."""
  samples = np.asarray(samples)
  out = np.empty((samples.shape[0],), np.float64)
  for i, row in enumerate(samples):
    _, counts = np.unique(row, return_counts=True)
    f = counts / counts.sum()
    out[i] = float(-np.sum(f * np.log(f)))
  return out


def _ngrams(row: np.ndarray, n: int):
  return [tuple(row[i:i + n].tolist()) for i in range(len(row) - n + 1)]


def distinct_ngrams(samples, n: int) -> float:
  """Distinct n-grams over all n-grams of the set (1.0: none repeats; NaN when rows are shorter than n)."""
  grams = [g for row in np.asarray(samples) for g in _ngrams(row, n)]
  return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_rate(samples, n: int = 4) -> float:
  """Mean over samples of the fraction of a sample's n-grams that occurred earlier in the same sample."""
  rates = []
  for row in np.asarray(samples):
    grams = _ngrams(row, n)
    if grams:
      rates.append(1.0 - len(set(grams)) / len(grams))
  return float(np.mean(rates)) if rates else float("nan")


# ---------------------------------------------------------------------------- the reference LM
@functools.lru_cache(maxsize=8)
def lm_apply_fn(model) -> Callable:
  """``apply_fn(params, inputs) -> logits`` of a causal LM in eval mode (cached per model)."""
  return lambda params, inputs: model.apply({"params": params}, inputs, deterministic=True)


@functools.partial(jax.jit, static_argnames=("apply_fn", "bos"))
def _nll(apply_fn, params, tokens, *, bos):
  return causal_lm.sequence_nll(apply_fn, params, tokens, bos)


def sequence_nll(apply_fn: Callable, params, samples, *, bos: int, batch_size: int = 256) -> np.ndarray:
  """``-log p(x)`` (nats, summed over the L tokens) of every row of ``samples [N, L]`` under the LM
  ``apply_fn(params, inputs) -> logits``, each row read after ``bos``: [N] float64."""
  samples = np.asarray(samples, np.int32)
  n = samples.shape[0]
  out = []
  for start in range(0, n, batch_size):
    part = samples[start:start + batch_size]
    m = part.shape[0]
    if m < batch_size and n > batch_size:  # one compiled shape: pad the last batch with its last row
      part = np.concatenate([part, np.repeat(part[-1:], batch_size - m, axis=0)])
    out.append(np.asarray(jax.device_get(_nll(apply_fn, params, part, bos=int(bos))), np.float64)[:m])
  return np.concatenate(out) if out else np.zeros((0,), np.float64)


def generative_perplexity(apply_fn: Callable, params, samples, *, bos: int, batch_size: int = 256) -> float:
  """``exp(sum_i -log p(x_i) / sum_i L)``: the perplexity per token of the set ``samples [N, L]``."""
  samples = np.asarray(samples)
  nll = sequence_nll(apply_fn, params, samples, bos=bos, batch_size=batch_size)
  return float(np.exp(nll.sum() / max(samples.size, 1)))


def train_reference_lm(model, train_tokens, *, steps: int, batch_size: int, lr: float = 3e-3, seed: int = 0,
                       bos: int, warmup_steps: int = 100, weight_decay: float = 0.01, log=None):
  """Trains the causal reference LM on ``train_tokens [N, L]`` (the training split only) with AdamW
  and a cosine schedule. Returns ``(params, {"loss": last-100-step mean, "seconds": wall time})``."""
  settings = TeacherSettings(steps=int(steps), lr=float(lr), warmup_steps=int(min(warmup_steps, steps // 2)),
                             weight_decay=float(weight_decay), grad_clip=1.0, b2=0.99)
  tx = settings.optimizer()
  state = causal_lm.init_state(model, tx, seed)
  step = jax.jit(causal_lm.make_train_step(model, tx, bos), donate_argnums=0)
  batches = batch_iterator(np.asarray(train_tokens), None, int(batch_size), int(seed))
  losses, t0 = [], time.time()
  for i in range(int(steps)):
    tokens, _ = next(batches)
    state, metrics = step(state, jnp.asarray(tokens))
    losses.append(metrics["loss"])
    if log is not None and (i + 1) % max(1, steps // 5) == 0:
      log(f"reference LM step {i + 1}/{steps}: loss {float(metrics['loss']):.3f}")
  tail = np.asarray(jax.device_get(losses[-100:]), np.float64)
  return state.params, {"loss": float(tail.mean()), "seconds": time.time() - t0}


# ---------------------------------------------------------------------------- one row of the table
def text_row(samples, *, lm_apply: Callable, lm_params, bos: int, ngrams: Sequence[int] = (1, 2, 3, 4),
             repeat_n: int = 4) -> Dict[str, float]:
  """Every metric of one sample set: ``gen_ppl``, ``entropy`` (mean unigram entropy), ``distinct_<n>``
  and ``repeat_<repeat_n>``."""
  samples = np.asarray(samples)
  row = {"gen_ppl": generative_perplexity(lm_apply, lm_params, samples, bos=bos),
         "entropy": float(unigram_entropy(samples).mean())}
  for n in ngrams:
    row[f"distinct_{n}"] = distinct_ngrams(samples, n)
  row[f"repeat_{repeat_n}"] = repeated_ngram_rate(samples, repeat_n)
  return row
