"""Text metrics against hand computations: generative perplexity of a fixed bigram model, entropy,
distinct and repeated n-grams, and the reference LM's training."""
import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.evaluation import text_metrics as tm
from dimo_jax.networks import causal_lm

V, BOS = 4, 3
BIGRAM = np.log(np.array([[0.5, 0.3, 0.1, 0.1], [0.2, 0.2, 0.5, 0.1], [0.25, 0.25, 0.25, 0.25],
                          [0.7, 0.1, 0.1, 0.1]]))  # row: the previous token (3 = bos)


def _bigram_apply(params, inputs):
  return params[inputs]  # logits at t depend on the token read at t only


def test_generative_perplexity_of_a_bigram_model_matches_the_hand_computation():
  samples = np.array([[0, 1, 2, 0], [1, 1, 0, 3]])
  p = np.exp(BIGRAM)
  # row 0: p(0|bos) p(1|0) p(2|1) p(0|2); row 1: p(1|bos) p(1|1) p(0|1) p(3|0)
  nll = -np.log([p[3, 0] * p[0, 1] * p[1, 2] * p[2, 0], p[3, 1] * p[1, 1] * p[1, 0] * p[0, 3]])
  got = tm.sequence_nll(_bigram_apply, jnp.asarray(BIGRAM, jnp.float32), samples, bos=BOS)
  np.testing.assert_allclose(got, nll, rtol=1e-5)
  ppl = tm.generative_perplexity(_bigram_apply, jnp.asarray(BIGRAM, jnp.float32), samples, bos=BOS)
  np.testing.assert_allclose(ppl, np.exp(nll.sum() / 8), rtol=1e-5)
  # batching with a padded last batch changes nothing
  many = np.tile(samples, (5, 1))
  np.testing.assert_allclose(tm.sequence_nll(_bigram_apply, jnp.asarray(BIGRAM, jnp.float32), many, bos=BOS,
                                             batch_size=4), np.tile(nll, 5), rtol=1e-5)


def test_entropy_distinct_and_repeats_by_hand():
  samples = np.array([[1, 1, 1, 1], [1, 2, 3, 4], [1, 1, 2, 2]])
  np.testing.assert_allclose(tm.unigram_entropy(samples), [0.0, np.log(4), np.log(2)])
  # unigrams: 12 tokens, 4 distinct; bigrams: (1,1)x4, (1,2)x2, (2,3), (3,4), (2,2): 9, 5 distinct
  assert tm.distinct_ngrams(samples, 1) == 4 / 12
  assert tm.distinct_ngrams(samples, 2) == 5 / 9
  # repeated bigrams per sample: [1,1,1,1] -> 2 of 3 repeat; others none
  np.testing.assert_allclose(tm.repeated_ngram_rate(samples, 2), (2 / 3) / 3)
  assert np.isnan(tm.distinct_ngrams(samples, 5))


def test_reference_lm_learns_a_deterministic_cycle():
  tokens = (np.arange(64 * 8).reshape(64, 8) % 3).astype(np.int32)  # 0 1 2 0 1 2 ...
  lm = causal_lm.CausalLM(vocab_size=4, seq_len=8, width=16, depth=1, heads=2, mlp_dim=32)
  params, info = tm.train_reference_lm(lm, tokens, steps=120, batch_size=16, lr=1e-2, bos=3, warmup_steps=10)
  ppl = tm.generative_perplexity(tm.lm_apply_fn(lm), params, tokens[:8], bos=3)
  assert ppl < 1.5 and info["loss"] < 0.5  # uniform would be 4
  shuffled = np.random.default_rng(0).integers(0, 3, (8, 8))
  assert tm.generative_perplexity(tm.lm_apply_fn(lm), params, shuffled, bos=3) > 3 * ppl
