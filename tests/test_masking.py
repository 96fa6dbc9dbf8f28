import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.core import masking


@pytest.mark.parametrize("schedule", masking.SCHEDULES)
def test_ratio_monotone_with_endpoints(schedule):
  u = jnp.linspace(0.0, 1.0, 101)
  r = np.asarray(masking.mask_ratio(schedule, u))
  assert np.all(np.diff(r) >= -1e-6)
  assert r.min() >= 0.0 and r.max() <= 1.0
  if schedule == "cosine_clamped":  # the authors' text-to-image states keep 2% on either side
    assert abs(r[0] - 0.02) < 1e-6 and abs(r[-1] - 0.98) < 1e-6
  elif schedule != "truncnorm":
    assert abs(r[0]) < 1e-6 and abs(r[-1] - 1.0) < 1e-6


def test_arccos_matches_authors_distribution():
  # The authors draw r = (2/pi) arccos(u), u ~ U(0,1); compare quantiles.
  u = np.random.default_rng(0).uniform(size=200_000)
  theirs = np.sort(2 / np.pi * np.arccos(u))
  ours = np.sort(np.asarray(masking.sample_mask_ratio(jax.random.key(0), "arccos", (200_000,))))
  np.testing.assert_allclose(np.quantile(ours, [0.1, 0.5, 0.9]), np.quantile(theirs, [0.1, 0.5, 0.9]), atol=5e-3)


def test_unknown_schedule_fails():
  with pytest.raises(ValueError, match="unknown mask schedule 'bogus'"):
    masking.mask_ratio("bogus", 0.5)


@pytest.mark.parametrize("schedule", masking.SCHEDULES)
@pytest.mark.parametrize("seq_len,steps", [(64, 1), (64, 8), (256, 16), (7, 7), (10, 3)])
def test_step_counts(schedule, seq_len, steps):
  counts = masking.step_counts(schedule, seq_len, steps)
  assert counts.shape == (steps,)
  assert counts.sum() == seq_len
  assert counts.min() >= 1
  remaining = masking.masks_for_step(seq_len, counts)
  assert np.all(np.diff(np.concatenate([[seq_len], remaining])) < 0)
  assert remaining[-1] == 0


def test_step_counts_known_answer_cosine():
  # Google MaskGIT: after step t, floor-ish N cos(pi/2 (t+1)/T) tokens stay masked.
  counts = masking.step_counts("cosine", 256, 8)
  remaining = masking.masks_for_step(256, counts)
  expected = np.round(256 * np.cos(np.pi / 2 * np.arange(1, 9) / 8)).astype(int)
  np.testing.assert_array_equal(remaining, expected)


def test_step_counts_bad_steps():
  with pytest.raises(ValueError, match="sampler steps"):
    masking.step_counts("arccos", 4, 5)


def test_exact_count_mask_counts():
  ratio = jnp.array([0.0, 0.1, 0.5, 0.6, 1.0])
  x = jnp.zeros((5, 256), jnp.int32)
  xt, mask, _ = masking.forward_mask(jax.random.key(1), x, 1024, ratio=ratio)
  expected = np.maximum(1, np.round(256 * np.asarray(ratio))).astype(int)
  np.testing.assert_array_equal(np.asarray(mask.sum(1)), expected)
  assert np.all(np.asarray(xt)[np.asarray(mask)] == 1024)
  assert np.all(np.asarray(xt)[~np.asarray(mask)] == 0)


@pytest.mark.parametrize("seq_len", [1, 7, 64, 257])
def test_exact_count_mask_every_count(seq_len):
  counts = jnp.arange(seq_len + 1)
  mask = masking.exact_count_mask(jax.random.key(seq_len), (seq_len + 1, seq_len), counts)
  np.testing.assert_array_equal(np.asarray(mask.sum(1)), np.arange(seq_len + 1))


def test_unique_random_scores_distinct_per_row():
  s = np.asarray(masking.unique_random_scores(jax.random.key(0), (64, 257)))
  assert all(len(np.unique(row)) == 257 for row in s)
  with pytest.raises(ValueError, match="too long"):
    masking.unique_random_scores(jax.random.key(0), (1, 70000))


def test_exact_count_positions_uniform():
  keys = jax.random.split(jax.random.key(2), 4000)
  masks = jax.vmap(lambda k: masking.exact_count_mask(k, (1, 8), jnp.array([3])))(keys)[:, 0]
  freq = np.asarray(masks).mean(0)
  np.testing.assert_allclose(freq, 3 / 8, atol=0.03)
  # Pairs are uniform too: P(both i and j masked) = 3/8 * 2/7.
  both = np.asarray(masks[:, 0] & masks[:, 5]).mean()
  assert abs(both - 3 / 8 * 2 / 7) < 0.025


def test_bernoulli_mask_rate():
  m = masking.bernoulli_mask(jax.random.key(3), (4, 10000), jnp.array([0.0, 0.25, 0.5, 1.0]))
  np.testing.assert_allclose(np.asarray(m).mean(1), [0.0, 0.25, 0.5, 1.0], atol=0.02)


def test_linear_schedule_with_independent_masking_draws_every_count_equally():
  # int_0^1 C(L, k) r^k (1 - r)^(L - k) dr = 1 / (L + 1): each number of masked positions 0..L
  # equally often, as an L-step sampler visits them; arccos draws one masked position ~40% rarer.
  seq_len, n = 6, 60000
  tokens = jnp.zeros((n, seq_len), jnp.int32)
  counts = {}
  for schedule in ("linear", "arccos"):
    _, mask, _ = masking.forward_mask(jax.random.key(11), tokens, 9, schedule, exact=False)
    counts[schedule] = np.bincount(np.asarray(mask).sum(1), minlength=seq_len + 1) / n
  np.testing.assert_allclose(counts["linear"], 1.0 / (seq_len + 1), atol=0.01)
  assert counts["arccos"][1] < 0.7 * counts["linear"][1]


@pytest.mark.parametrize("r_init,n_masks", [(0.6, 154), (1.0, 256), (0.0, 0)])
def test_x_init(r_init, n_masks):
  x = masking.make_x_init(jax.random.key(4), 6, 256, 1024, r_init)
  x = np.asarray(x)
  np.testing.assert_array_equal((x == 1024).sum(1), n_masks)
  assert x.min() >= 0 and x.max() <= 1024
  if n_masks < 256:  # the rest are uniform random codes
    codes = x[x < 1024]
    assert len(np.unique(codes)) > 0.5 * min(len(codes), 1024)


def test_parse_r_init():
  assert float(masking.parse_r_init("fix_0.6")(jax.random.key(0))) == pytest.approx(0.6)
  assert float(masking.parse_r_init(0.3)(jax.random.key(0))) == pytest.approx(0.3)
  vals = [float(masking.parse_r_init("random_0.4_0.8")(jax.random.key(i))) for i in range(50)]
  assert min(vals) >= 0.4 and max(vals) <= 0.8 and np.std(vals) > 0.05
  for bad in ["fix_", "random_0.8_0.4", "half", 1.5, None]:
    with pytest.raises(ValueError, match="r_init"):
      masking.parse_r_init(bad)


class MaskingVariantsTest(chex.TestCase):
  """The forward process and x_init draw the same arrays with and without jit (the same key), with
  the promised counts."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_mask_jit_and_eager(self):
    x = jnp.arange(4 * 32, dtype=jnp.int32).reshape(4, 32) % 50
    ratio = jnp.array([0.1, 0.3, 0.6, 1.0])
    fn = functools.partial(masking.forward_mask, mask_id=50, schedule="cosine")
    xt, mask, r = self.variant(lambda k, t, rr: fn(k, t, ratio=rr))(jax.random.key(5), x, ratio)
    chex.assert_shape((xt, mask), (4, 32))
    chex.assert_type(xt, jnp.int32)
    chex.assert_trees_all_close((xt, mask, r), fn(jax.random.key(5), x, ratio=ratio))
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), np.maximum(1, np.round(32 * np.asarray(ratio))))
    chex.assert_trees_all_equal(jnp.where(mask, x, xt), x)  # visible tokens untouched
    # Drawn ratios (no ratio given): one per row, in [0, 1].
    _, _, drawn = self.variant(lambda k, t: fn(k, t))(jax.random.key(6), x)
    chex.assert_shape(drawn, (4,))
    assert float(drawn.min()) >= 0.0 and float(drawn.max()) <= 1.0

  @chex.variants(with_jit=True, without_jit=True)
  def test_x_init_jit_and_eager(self):
    fn = functools.partial(masking.make_x_init, batch=5, seq_len=40, vocab_size=9)
    x = self.variant(lambda k, r: fn(k, r_init=r))(jax.random.key(7), jnp.float32(0.6))
    chex.assert_shape(x, (5, 40))
    chex.assert_trees_all_equal(x, fn(jax.random.key(7), r_init=0.6))
    np.testing.assert_array_equal(np.asarray((x == 9).sum(1)), 24)
