"""Float64 categorical draws against exact probabilities, and the text samplers built on them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dimo_jax.core import categorical

PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.04, 0.009, 0.001])


@pytest.mark.parametrize("method", ["gumbel_max", "inverse_cdf"])
def test_float64_draws_match_the_probabilities(method):
  n = 200_000
  logits = np.broadcast_to(np.log(PROBS).astype(np.float32), (n, PROBS.size))
  with categorical.float64_mode():
    draws = np.asarray(categorical.sample(jax.random.key(0), logits, method=method))
  counts = np.bincount(draws, minlength=PROBS.size)
  assert counts.sum() == n
  # chi-square goodness of fit against the exact categorical (p_value tiny only if wrong)
  assert stats.chisquare(counts, PROBS / PROBS.sum() * n).pvalue > 1e-3
  # and a deliberately wrong distribution (temperature 0.9) is rejected by the same test
  sharp = np.exp(np.log(PROBS) / 0.9)
  assert stats.chisquare(counts, sharp / sharp.sum() * n).pvalue < 1e-6


def test_temperature_and_excluded_entries():
  logits = np.array([[np.log(0.6), np.log(0.4), -np.inf]] * 100_000, np.float32)
  with categorical.float64_mode():
    draws = np.asarray(categorical.sample(jax.random.key(1), logits, temperature=0.5, method="inverse_cdf"))
    draws_g = np.asarray(categorical.sample(jax.random.key(1), logits, temperature=0.5))
  expected = np.array([0.36, 0.16]) / 0.52
  for d in (draws, draws_g):
    assert d.max() < 2
    assert abs(np.mean(d == 0) - expected[0]) < 0.01


def test_float64_draws_outside_x64_name_the_fix():
  with pytest.raises(ValueError, match="float64_mode"):
    categorical.sample(jax.random.key(0), jnp.zeros((2, 3)), method="gumbel_max")
  with pytest.raises(ValueError, match="unknown categorical sampling method 'f16'"):
    categorical.sample(jax.random.key(0), jnp.zeros((2, 3)), method="f16")


_TABLE = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05]], np.float32))


def _fixed_model(params, tokens, labels):
  """Per-position logits that ignore the input (so every sampler's marginals are the table's)."""
  del labels
  logits = jnp.broadcast_to(params, tokens.shape + (3,))
  return jnp.concatenate([logits, jnp.full(tokens.shape + (1,), -1e4)], axis=-1)


@pytest.mark.parametrize("order, steps", [("ancestral", 1), ("ancestral", 3), ("confidence", 2)])
def test_iterative_sampler_fills_every_mask_with_the_model_marginals(order, steps):
  n = 4000
  with categorical.float64_mode():
    out = np.asarray(categorical.iterative_sample(
        _fixed_model, jnp.asarray(_TABLE), jax.random.key(2), np.zeros(n, np.int32), seq_len=4, codebook_size=3,
        steps=steps, order=order, schedule="linear", r_temp=0.0 if order == "confidence" else 4.5))
  assert out.shape == (n, 4) and out.max() < 3 and out.min() >= 0
  if order == "ancestral":  # independent positions: the reveal order does not change the marginals
    freq = np.stack([np.bincount(out[:, i], minlength=3) / n for i in range(4)])
    np.testing.assert_allclose(freq, np.exp(_TABLE), atol=0.03)


def test_sampler_rejects_more_steps_than_positions():
  with pytest.raises(ValueError, match="steps must be in"):
    categorical.iterative_sample(_fixed_model, jnp.asarray(_TABLE), jax.random.key(0), np.zeros(2, np.int32),
                                 seq_len=4, codebook_size=3, steps=5, method="float32_gumbel")
