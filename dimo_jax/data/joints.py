"""Known joint distributions for checking one-step distillation exactly.

- ``copy_pair``: two positions that are always equal, (x, x) with x uniform over V values (its
  exact conditionals as a network: ``networks.exact.ExactConditionalTeacher``).
- ``markov_mixture``: a mixture of Markov chains over V values and L positions, whose
  dependence between positions parallel sampling cannot capture.
- ``tv_distance``: the exact total-variation distance of a sample to an enumerable joint;
  ``sampling_floor`` the same for an i.i.d. sample of the truth; ``diversity`` and
  ``position_entropy`` summarise how spread a sample is.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Joint:
  """An enumerable joint over ``V ** L`` sequences: ``support`` [S, L] and ``probs`` [S]."""
  support: np.ndarray
  probs: np.ndarray
  vocab_size: int

  @property
  def seq_len(self) -> int:
    return self.support.shape[1]

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    idx = rng.choice(len(self.probs), size=n, p=self.probs)
    return self.support[idx].astype(np.int32)

  def index(self, tokens: np.ndarray) -> np.ndarray:
    """Row index of each sequence in the full enumeration; ``tokens`` int [N, L] in [0, V)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
      raise ValueError(f"samples must be int tokens [N, L={self.seq_len}], got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
      raise ValueError(f"samples hold values in [{tokens.min()}, {tokens.max()}] outside the vocabulary "
                       f"[0, {self.vocab_size}); mask ids ({self.vocab_size}) must be filled before scoring")
    weights = self.vocab_size ** np.arange(self.seq_len - 1, -1, -1)
    return tokens.astype(np.int64) @ weights


def _all_sequences(vocab_size: int, seq_len: int) -> np.ndarray:
  return np.array(list(itertools.product(range(vocab_size), repeat=seq_len)), np.int32)


def _check_positive(**kwargs):
  for name, value in kwargs.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def copy_pair(vocab_size: int = 8) -> Joint:
  """(x, x) with x uniform over ``vocab_size`` values."""
  _check_positive(vocab_size=vocab_size)
  support = _all_sequences(vocab_size, 2)
  probs = (support[:, 0] == support[:, 1]).astype(np.float64)
  return Joint(support, probs / probs.sum(), vocab_size)


def markov_mixture(vocab_size: int = 4, seq_len: int = 7, num_chains: int = 3, concentration: float = 0.3,
                   seed: int = 0) -> Joint:
  """Mixture of ``num_chains`` Markov chains with sparse (Dirichlet) initial and transition laws."""
  _check_positive(vocab_size=vocab_size, seq_len=seq_len, num_chains=num_chains)
  if vocab_size ** seq_len > 2**22:
    raise ValueError(f"vocab_size ** seq_len = {vocab_size ** seq_len} sequences is too many to enumerate "
                     "(limit 2**22); use fewer positions or values")
  if concentration <= 0:
    raise ValueError(f"concentration must be > 0, got {concentration}")
  rng = np.random.default_rng(seed)
  weights = rng.dirichlet(np.ones(num_chains))
  support = _all_sequences(vocab_size, seq_len)
  probs = np.zeros(len(support))
  for c in range(num_chains):
    init = rng.dirichlet(np.full(vocab_size, concentration))
    trans = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
    p = init[support[:, 0]]
    for i in range(1, seq_len):
      p = p * trans[support[:, i - 1], support[:, i]]
    probs += weights[c] * p
  return Joint(support, probs / probs.sum(), vocab_size)


def tv_distance(joint: Joint, samples: np.ndarray) -> float:
  """0.5 * sum |p_hat - p| over the whole support (exact for the empirical law of ``samples``)."""
  counts = np.bincount(joint.index(samples), minlength=len(joint.probs)).astype(np.float64)
  return 0.5 * float(np.abs(counts / counts.sum() - joint.probs).sum())


def sampling_floor(joint: Joint, n: int, seed: int = 0) -> float:
  """TV of an i.i.d. sample of size ``n`` from the truth itself: the best a sampler can show."""
  _check_positive(n=n)
  return tv_distance(joint, joint.sample(np.random.default_rng(seed), n))


def diversity(joint: Joint, samples: np.ndarray) -> dict:
  """Distinct sequences, plug-in entropy (nats) of the sequences and the most frequent one's share."""
  counts = np.bincount(joint.index(samples), minlength=len(joint.probs)).astype(np.float64)
  f = counts[counts > 0] / counts.sum()
  return {"distinct": int((counts > 0).sum()), "entropy": float(-(f * np.log(f)).sum()),
          "top_share": float(f.max())}


def position_entropy(samples: np.ndarray, vocab_size: int, position: int = 0) -> float:
  """Plug-in entropy of the values at one position, in units of log(vocab_size) (1 = uniform)."""
  values = np.asarray(samples)[:, position]
  f = np.bincount(values, minlength=vocab_size) / len(values)
  f = f[f > 0]
  return float(-(f * np.log(f)).sum() / np.log(vocab_size))
