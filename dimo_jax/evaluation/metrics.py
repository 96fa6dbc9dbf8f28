"""Sample-quality metrics computed from Inception features and predictions.

FID, Inception Score, precision / recall / density / coverage (Naeem et al. 2020),
reference-statistics loading and the per-position token-count histogram used by the
entropy-shift diagnostic. Pure NumPy / SciPy; inputs may be NumPy or JAX arrays.
"""

from __future__ import annotations

import os
from typing import Dict, Tuple

import numpy as np
import scipy.linalg


def _as_2d_float64(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f'{name} must be a 2-D array [num_samples, feature_dim], '
                     f'got shape {x.shape}.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} contains NaN or Inf values.')
  return x


def feature_stats(feats) -> Tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]."""
  feats = _as_2d_float64(feats, 'feats')
  if feats.shape[0] < 2:
    raise ValueError('feature_stats needs at least 2 samples to estimate a covariance, '
                     f'got {feats.shape[0]}.')
  mu = feats.mean(axis=0)
  sigma = np.cov(feats, rowvar=False)
  return mu, np.atleast_2d(sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).
  If the matrix square root is not finite (singular product), `eps` * I is added to
  both covariances. Small imaginary parts from numerical error are dropped; large
  ones raise ValueError.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f'mu1 and mu2 must be 1-D with equal shapes, got {mu1.shape} and '
                     f'{mu2.shape}.')
  d = mu1.shape[0]
  for name, s in (('sigma1', sigma1), ('sigma2', sigma2)):
    if s.shape != (d, d):
      raise ValueError(f'{name} must have shape ({d}, {d}) to match mu, got {s.shape}.')

  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > 1e-3:
      raise ValueError('Matrix square root of sigma1 @ sigma2 has a large imaginary '
                       f'component ({max_imag:.3g}); check that both covariances are '
                       'symmetric positive semi-definite.')
    covmean = covmean.real
  tr_covmean = np.trace(covmean)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(feats1, feats2) -> float:
  """FID between two feature sets [N1, D] and [N2, D]."""
  mu1, s1 = feature_stats(feats1)
  mu2, s2 = feature_stats(feats2)
  if mu1.shape != mu2.shape:
    raise ValueError(f'Feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}.')
  return frechet_distance(mu1, s1, mu2, s2)


def inception_score(logits_or_probs, splits: int = 10,
                    from_logits: bool = True) -> Tuple[float, float]:
  """Inception Score: mean and std over `splits` of exp(E_x KL(p(y|x) || p(y))).

  Args:
    logits_or_probs: [N, C] class logits (from_logits=True) or probabilities.
    splits: number of equal consecutive chunks the samples are divided into.
    from_logits: whether the input holds logits (softmax is applied) or probabilities.
  """
  x = _as_2d_float64(logits_or_probs, 'logits_or_probs')
  n = x.shape[0]
  if splits < 1 or splits > n:
    raise ValueError(f'splits must be in [1, num_samples={n}], got {splits}.')
  if from_logits:
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.sum(np.exp(x), axis=1, keepdims=True))
    probs = np.exp(log_p)
  else:
    probs = x
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
      raise ValueError('With from_logits=False every row must be a probability '
                       'distribution (non-negative, summing to 1); pass '
                       'from_logits=True for logits.')
  scores = []
  for i in range(splits):
    part = probs[i * n // splits:(i + 1) * n // splits]
    p_y = part.mean(axis=0, keepdims=True)
    # xlogy convention: 0 * log(0 / q) = 0.
    with np.errstate(divide='ignore', invalid='ignore'):
      terms = np.where(part > 0, part * (np.log(part) - np.log(p_y)), 0.0)
    kl = terms.sum(axis=1).mean()
    scores.append(np.exp(kl))
  scores = np.asarray(scores)
  return float(scores.mean()), float(scores.std())


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum('ij,ij->i', x, x)


def _sq_dists(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray):
  d = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def _kth_nn_sq_radii(x: np.ndarray, x_sq: np.ndarray, k: int, chunk_size: int):
  """Squared distance to the k-th nearest neighbour of each row, self excluded."""
  radii = np.empty(x.shape[0], dtype=np.float64)
  for start in range(0, x.shape[0], chunk_size):
    stop = min(start + chunk_size, x.shape[0])
    d = _sq_dists(x[start:stop], x_sq[start:stop], x, x_sq)
    # The (k+1)-th smallest value counts the zero self-distance.
    radii[start:stop] = np.partition(d, k, axis=1)[:, k]
  return radii


def prdc(real_feats, fake_feats, k: int = 3, chunk_size: int = 1024) -> Dict[str, float]:
  """Precision, recall, density and coverage (Naeem et al. 2020).

  Euclidean k-NN radii are computed within each set (self excluded). Pairwise
  distances are evaluated in row chunks of `chunk_size`, so memory is
  O(chunk_size * max(N_real, N_fake)).
  """
  real = _as_2d_float64(real_feats, 'real_feats')
  fake = _as_2d_float64(fake_feats, 'fake_feats')
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'Feature dims differ: real {real.shape[1]} vs fake {fake.shape[1]}.')
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}.')
  for name, arr in (('real_feats', real), ('fake_feats', fake)):
    if arr.shape[0] <= k:
      raise ValueError(f'{name} needs more than k={k} samples, got {arr.shape[0]}.')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}.')

  real_sq, fake_sq = _sq_norms(real), _sq_norms(fake)
  real_r = _kth_nn_sq_radii(real, real_sq, k, chunk_size)
  fake_r = _kth_nn_sq_radii(fake, fake_sq, k, chunk_size)

  fake_hits = np.zeros(fake.shape[0], dtype=np.int64)  # real balls containing fake j
  recall_hit = np.zeros(real.shape[0], dtype=bool)
  covered = np.zeros(real.shape[0], dtype=bool)
  for start in range(0, real.shape[0], chunk_size):
    stop = min(start + chunk_size, real.shape[0])
    d = _sq_dists(real[start:stop], real_sq[start:stop], fake, fake_sq)  # [c, N_fake]
    inside_real = d < real_r[start:stop, None]
    fake_hits += inside_real.sum(axis=0)
    recall_hit[start:stop] = (d < fake_r[None, :]).any(axis=1)
    covered[start:stop] = d.min(axis=1) < real_r[start:stop]

  return dict(
      precision=float((fake_hits > 0).mean()),
      recall=float(recall_hit.mean()),
      density=float(fake_hits.mean() / k),
      coverage=float(covered.mean()),
  )


def load_reference_stats(path) -> Tuple[np.ndarray, np.ndarray]:
  """Loads (mu [D], sigma [D, D]) as float64 from an `.npz` with keys `mu` and `sigma`."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Reference statistics file not found: {path}')
  with np.load(path, allow_pickle=False) as data:
    keys = sorted(data.files)
    missing = [key for key in ('mu', 'sigma') if key not in data.files]
    if missing:
      raise ValueError(f'Reference statistics file {path} lacks key(s) {missing}; found '
                       f'keys {keys}. Expected an .npz with arrays `mu` [D] and '
                       '`sigma` [D, D].')
    mu = np.asarray(data['mu'], dtype=np.float64)
    sigma = np.asarray(data['sigma'], dtype=np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'Reference statistics file {path}: expected mu [D] and sigma [D, D], '
                     f'got mu {mu.shape} and sigma {sigma.shape}.')
  return mu, sigma


def entropy_shift_histogram(probs, threshold: float = 1e-3) -> np.ndarray:
  """Histogram of how many tokens exceed `threshold` probability at each position.

  Args:
    probs: [..., V] token distributions; every leading index is one position.
    threshold: probability above which a token is counted.

  Returns:
    int64 array of length V + 1; entry c is the number of positions with exactly c
    tokens of probability > threshold.
  """
  probs = np.asarray(probs)
  if probs.ndim < 1 or probs.shape[-1] < 1:
    raise ValueError(f'probs must have a vocabulary axis last, got shape {probs.shape}.')
  counts = np.sum(probs > threshold, axis=-1).reshape(-1)
  return np.bincount(counts, minlength=probs.shape[-1] + 1).astype(np.int64)
