"""Known-answer tests for FID, IS, PRDC, reference stats and the entropy-shift histogram."""

import numpy as np
import pytest

from dimo_jax.evaluation import metrics


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _psd_sqrt(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_reference(mu1, s1, mu2, s2):
  """Tr((S1 S2)^{1/2}) via the symmetric form (S1^{1/2} S2 S1^{1/2})^{1/2} (eigh only)."""
  r1 = _psd_sqrt(s1)
  w = np.linalg.eigvalsh(r1 @ s2 @ r1)
  tr_sqrt = np.sum(np.sqrt(np.clip(w, 0, None)))
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


def test_feature_stats_matches_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 4)).astype(np.float32)
  mu, sigma = metrics.feature_stats(x)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, xc.T @ xc / 49, rtol=1e-10)
  with pytest.raises(ValueError, match='at least 2'):
    metrics.feature_stats(x[:1])
  with pytest.raises(ValueError, match='2-D'):
    metrics.feature_stats(x[0])


def test_fid_identical_sets_is_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
  assert abs(metrics.fid_from_features(x, x)) < 1e-6


def test_fid_diagonal_gaussians_closed_form():
  rng = np.random.default_rng(2)
  d = 8
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert isinstance(got, float)
  assert got == pytest.approx(expected, rel=1e-9, abs=1e-10)


def test_fid_commuting_covariances():
  # Shared eigenvectors: Tr((S1 S2)^{1/2}) = sum sqrt(l1 * l2).
  rng = np.random.default_rng(3)
  d = 10
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  l1, l2 = rng.uniform(0.2, 4.0, size=d), rng.uniform(0.2, 4.0, size=d)
  s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
  mu1, mu2 = rng.normal(size=d), np.zeros(d)
  expected = mu1 @ mu1 + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_general_covariances():
  rng = np.random.default_rng(4)
  d = 12
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = _fid_reference(mu1, s1, mu2, s2)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
  # Symmetric in its arguments.
  assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_fid_from_features_matches_stats():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(300, 6))
  b = 0.5 + 1.5 * rng.normal(size=(200, 6))
  mu1, s1 = metrics.feature_stats(a)
  mu2, s2 = metrics.feature_stats(b)
  got = metrics.fid_from_features(a, b)
  assert got == pytest.approx(_fid_reference(mu1, s1, mu2, s2), rel=1e-8)
  assert got > 1.0


def test_fid_singular_covariance_is_finite():
  # Fewer samples than dims: rank-deficient covariances.
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
  got = metrics.fid_from_features(a, b)
  mu1, s1 = metrics.feature_stats(a)
  mu2, s2 = metrics.feature_stats(b)
  assert np.isfinite(got)
  assert got == pytest.approx(_fid_reference(mu1, s1, mu2, s2), rel=1e-3)


def test_fid_bad_shapes():
  with pytest.raises(ValueError, match='sigma2'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match='mu1 and mu2'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_uniform_is_one():
  probs = np.full((100, 10), 0.1)
  mean, std = metrics.inception_score(probs, splits=5, from_logits=False)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  mean, _ = metrics.inception_score(np.zeros((100, 10)), splits=5)  # equal logits
  assert mean == pytest.approx(1.0, abs=1e-12)


def test_inception_score_confident_distinct_classes():
  num_classes = 8
  probs = np.tile(np.eye(num_classes), (4, 1))  # each split of 8 sees all 8 classes once
  mean, std = metrics.inception_score(probs, splits=4, from_logits=False)
  assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
  mean, _ = metrics.inception_score(100.0 * probs, splits=4, from_logits=True)
  assert mean == pytest.approx(num_classes, rel=1e-6)
  # Only 4 distinct classes used out of 1008 -> IS = 4.
  probs = np.zeros((8, 1008))
  probs[np.arange(8), np.arange(8) % 4] = 1.0
  mean, _ = metrics.inception_score(probs, splits=1, from_logits=False)
  assert mean == pytest.approx(4.0, rel=1e-12)


def test_inception_score_known_value():
  # Two samples, p1 = (0.75, 0.25), p2 = (0.25, 0.75): marginal uniform.
  probs = np.array([[0.75, 0.25], [0.25, 0.75]])
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  mean, _ = metrics.inception_score(probs, splits=1, from_logits=False)
  assert mean == pytest.approx(np.exp(kl), rel=1e-12)


def test_inception_score_bad_input():
  with pytest.raises(ValueError, match='splits'):
    metrics.inception_score(np.zeros((5, 3)), splits=10)
  with pytest.raises(ValueError, match='from_logits'):
    metrics.inception_score(np.ones((5, 3)), splits=1, from_logits=False)


def _prdc_bruteforce(real, fake, k):
  d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
  d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
  d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
  r_real = np.sort(d_rr, axis=1)[:, k]
  r_fake = np.sort(d_ff, axis=1)[:, k]
  inside = d_rf < r_real[:, None]
  return dict(
      precision=inside.any(axis=0).mean(),
      recall=(d_rf < r_fake[None, :]).any(axis=1).mean(),
      density=inside.sum(axis=0).mean() / k,
      coverage=(d_rf.min(axis=1) < r_real).mean(),
  )


def test_prdc_identical_sets():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(64, 5))
  out = metrics.prdc(x, x.copy(), k=3, chunk_size=16)
  assert out['precision'] == 1.0 and out['recall'] == 1.0 and out['coverage'] == 1.0
  assert out['density'] == pytest.approx(1.0, abs=1.0 / (3 * 64) + 1e-12)


def test_prdc_disjoint_far_sets():
  rng = np.random.default_rng(8)
  real = rng.normal(size=(40, 5))
  fake = rng.normal(size=(30, 5)) + 1000.0
  out = metrics.prdc(real, fake, k=3)
  assert out == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)


@pytest.mark.parametrize('chunk_size', [1, 7, 1024])
def test_prdc_matches_bruteforce(chunk_size):
  rng = np.random.default_rng(9)
  real = rng.normal(size=(50, 4))
  fake = 0.7 * rng.normal(size=(37, 4)) + 1.0
  out = metrics.prdc(real, fake, k=5, chunk_size=chunk_size)
  ref = _prdc_bruteforce(real, fake, 5)
  for key in ('precision', 'recall', 'density', 'coverage'):
    assert out[key] == pytest.approx(ref[key], abs=1e-12), key
  assert 0.0 < out['precision'] < 1.0 and 0.0 < out['coverage'] < 1.0


def test_prdc_bad_input():
  x = np.zeros((3, 2))
  with pytest.raises(ValueError, match='more than k=3'):
    metrics.prdc(x, np.zeros((10, 2)), k=3)
  with pytest.raises(ValueError, match='Feature dims'):
    metrics.prdc(np.zeros((10, 2)), np.zeros((10, 3)), k=3)


def test_load_reference_stats(tmp_path):
  mu, sigma = np.arange(3.0, dtype=np.float32), np.eye(3, dtype=np.float32)
  good = tmp_path / 'stats.npz'
  np.savez(good, mu=mu, sigma=sigma)
  got_mu, got_sigma = metrics.load_reference_stats(good)
  assert got_mu.dtype == np.float64 and got_sigma.dtype == np.float64
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)

  bad = tmp_path / 'bad_stats.npz'
  np.savez(bad, mean=mu, cov=sigma)
  with pytest.raises(ValueError) as info:
    metrics.load_reference_stats(bad)
  msg = str(info.value)
  assert 'bad_stats.npz' in msg and "'mean'" in msg and "'cov'" in msg and 'mu' in msg

  misshaped = tmp_path / 'misshaped.npz'
  np.savez(misshaped, mu=mu, sigma=np.eye(4))
  with pytest.raises(ValueError, match='misshaped.npz'):
    metrics.load_reference_stats(misshaped)
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    metrics.load_reference_stats(tmp_path / 'missing.npz')


def test_entropy_shift_histogram():
  probs = np.zeros((2, 3, 5))
  probs[0, 0] = [1, 0, 0, 0, 0]          # 1 token above threshold
  probs[0, 1] = [0.5, 0.5, 0, 0, 0]      # 2
  probs[0, 2] = [0.2] * 5                # 5
  probs[1, 0] = [0.999, 0.0005, 0.0005, 0, 0]  # 1 (0.0005 <= 1e-3)
  probs[1, 1] = [0.5, 0.5, 0, 0, 0]      # 2
  probs[1, 2] = [0.998, 0.001, 0.001, 0, 0]  # 1 (strictly greater than threshold)
  hist = metrics.entropy_shift_histogram(probs, threshold=1e-3)
  np.testing.assert_array_equal(hist, [0, 3, 2, 0, 0, 1])
  assert hist.sum() == 6
  hist = metrics.entropy_shift_histogram(probs, threshold=0.3)
  np.testing.assert_array_equal(hist, [1, 3, 2, 0, 0, 0])
