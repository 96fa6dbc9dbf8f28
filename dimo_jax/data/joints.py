"""Known joint distributions for checking one-step distillation exactly.

- ``copy_pair``: two positions that are always equal, (x, x) with x uniform over V values (its
  exact conditionals as a network: ``networks.exact.ExactConditionalTeacher``).
- ``markov_mixture``: a mixture of Markov chains over V values and L positions, whose
  dependence between positions parallel sampling cannot capture.
- ``weighted_sum``, ``sorted_values``, ``count_code``, ``balanced``: joints with global constraints
  (the last position a weighted sum of all the others, non-decreasing sequences under a permuted
  order of the values, the last position the count of one value, fixed counts of every value),
  drawn by ``draw_global_joint`` at the sizes of ``GLOBAL_SIZES``.
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


# ---------------------------------------------------------------------------- benchmark families
MAX_ENUMERABLE = 2**22


def _check_enumerable(vocab_size: int, seq_len: int):
  if vocab_size ** seq_len > MAX_ENUMERABLE:
    raise ValueError(f"vocab_size ** seq_len = {vocab_size ** seq_len} sequences is too many to enumerate "
                     f"(limit {MAX_ENUMERABLE}); use fewer positions or values")


def _normalised(support: np.ndarray, probs: np.ndarray, vocab_size: int) -> Joint:
  probs = np.asarray(probs, np.float64)
  return Joint(support, probs / probs.sum(), vocab_size)


def _chain_probs(support: np.ndarray, rng: np.random.Generator, vocab_size: int, order: int,
                 concentration: float) -> np.ndarray:
  """Probability of every row of ``support`` under one random Markov chain of ``order`` (>= 1):
  sparse Dirichlet laws for the first ``order`` positions (chained) and for each context."""
  seq_len = support.shape[1]
  p = np.ones(len(support))
  # The first positions: a chain of growing contexts (orders 1 .. order - 1), then the full order.
  for i in range(seq_len):
    k = min(i, order)
    ctx = np.zeros(len(support), np.int64)
    for j in range(i - k, i):
      ctx = ctx * vocab_size + support[:, j]
    table = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size ** k)
    p = p * table[ctx, support[:, i]]
  return p


def markov_order_mixture(vocab_size: int = 4, seq_len: int = 6, num_chains: int = 2, order: int = 2,
                         concentration: float = 0.3, seed: int = 0) -> Joint:
  """Mixture of ``num_chains`` Markov chains of ``order`` (each position depends on the
  ``order`` before it) with sparse Dirichlet laws; ``order=1`` is ``markov_mixture``'s family."""
  _check_positive(vocab_size=vocab_size, seq_len=seq_len, num_chains=num_chains, order=order)
  _check_enumerable(vocab_size, seq_len)
  rng = np.random.default_rng(seed)
  weights = rng.dirichlet(np.ones(num_chains))
  support = _all_sequences(vocab_size, seq_len)
  probs = sum(w * _chain_probs(support, rng, vocab_size, order, concentration) for w in weights)
  return _normalised(support, probs, vocab_size)


def hidden_markov(vocab_size: int = 4, seq_len: int = 6, num_states: int = 3, concentration: float = 0.3,
                  seed: int = 0) -> Joint:
  """A hidden Markov model: ``num_states`` hidden states with sparse transitions, each emitting
  one of ``vocab_size`` values from a sparse law; probabilities by the forward algorithm."""
  _check_positive(vocab_size=vocab_size, seq_len=seq_len, num_states=num_states)
  _check_enumerable(vocab_size, seq_len)
  rng = np.random.default_rng(seed)
  init = rng.dirichlet(np.full(num_states, concentration))
  trans = rng.dirichlet(np.full(num_states, concentration), size=num_states)
  emit = rng.dirichlet(np.full(vocab_size, concentration), size=num_states)
  support = _all_sequences(vocab_size, seq_len)
  alpha = init[None, :] * emit[:, support[:, 0]].T  # [S, H]
  for i in range(1, seq_len):
    alpha = (alpha @ trans) * emit[:, support[:, i]].T
  return _normalised(support, alpha.sum(1), vocab_size)


def sum_rule(vocab_size: int = 3, seq_len: int = 6, num_chains: int = 2, concentration: float = 0.5,
             seed: int = 0) -> Joint:
  """The first ``seq_len - 1`` positions from a Markov-chain mixture, the last their sum modulo
  ``vocab_size`` (a parity bit for two values): one position a deterministic function of the others."""
  _check_positive(vocab_size=vocab_size, num_chains=num_chains)
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  _check_enumerable(vocab_size, seq_len)
  head = markov_order_mixture(vocab_size, seq_len - 1, num_chains, 1, concentration, seed)
  support = _all_sequences(vocab_size, seq_len)
  ok = support[:, -1] == support[:, :-1].sum(1) % vocab_size
  probs = np.where(ok, head.probs[head.index(support[:, :-1])], 0.0)
  return _normalised(support, probs, vocab_size)


def copy_permutation(vocab_size: int = 4, seq_len: int = 6, num_chains: int = 2, concentration: float = 0.5,
                     seed: int = 0) -> Joint:
  """The first ceil(L/2) positions from a Markov-chain mixture; each later position copies one
  earlier position chosen by a seeded permutation, its value mapped by a seeded permutation of
  the vocabulary (copy and permutation structure at long range)."""
  _check_positive(vocab_size=vocab_size, num_chains=num_chains)
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  _check_enumerable(vocab_size, seq_len)
  rng = np.random.default_rng(seed)
  head_len = (seq_len + 1) // 2
  sources = rng.permutation(head_len)[:seq_len - head_len]
  maps = np.stack([rng.permutation(vocab_size) for _ in range(seq_len - head_len)])
  head = markov_order_mixture(vocab_size, head_len, num_chains, 1, concentration, int(rng.integers(2**31)))
  support = _all_sequences(vocab_size, seq_len)
  ok = np.ones(len(support), bool)
  for k, src in enumerate(sources):
    ok &= support[:, head_len + k] == maps[k][support[:, src]]
  probs = np.where(ok, head.probs[head.index(support[:, :head_len])], 0.0)
  return _normalised(support, probs, vocab_size)


def _head(vocab_size: int, seq_len: int, rng: np.random.Generator, num_chains: int = 2,
          concentration: float = 0.5) -> Joint:
  """A Markov-chain mixture (order 1) with parameters from ``rng``: the free part of a constrained joint."""
  return markov_order_mixture(vocab_size, seq_len, num_chains, 1, concentration, int(rng.integers(2**31)))


def _constrained(vocab_size: int, seq_len: int, num_chains: int, concentration: float, seed: int, rule):
  """The last position fixed by ``rule(head_rows, rng) -> values`` of the first ``seq_len - 1``
  positions, which follow a Markov-chain mixture."""
  _check_positive(vocab_size=vocab_size, num_chains=num_chains)
  if seq_len < 3:
    raise ValueError(f"seq_len must be >= 3, got {seq_len}")
  _check_enumerable(vocab_size, seq_len)
  rng = np.random.default_rng(seed)
  last = rule(rng)
  head = _head(vocab_size, seq_len - 1, rng, num_chains, concentration)
  support = _all_sequences(vocab_size, seq_len)
  ok = support[:, -1] == last(support[:, :-1])
  return _normalised(support, np.where(ok, head.probs[head.index(support[:, :-1])], 0.0), vocab_size)


def weighted_sum(vocab_size: int = 3, seq_len: int = 7, num_chains: int = 2, concentration: float = 0.5,
                 seed: int = 0) -> Joint:
  """The last position is sum_i a_i x_i modulo ``vocab_size`` over all the others, with seeded
  weights a_i in [1, V) (a check digit): one position fixed by every other one."""
  def rule(rng):
    weights = rng.integers(1, max(vocab_size, 2), size=seq_len - 1)
    return lambda head: (head * weights).sum(1) % vocab_size
  return _constrained(vocab_size, seq_len, num_chains, concentration, seed, rule)


def count_code(vocab_size: int = 4, seq_len: int = 7, num_chains: int = 2, concentration: float = 0.5,
               seed: int = 0) -> Joint:
  """The last position holds how many of the others equal a seeded value, modulo ``vocab_size``."""
  def rule(rng):
    value = int(rng.integers(vocab_size))
    return lambda head: (head == value).sum(1) % vocab_size
  return _constrained(vocab_size, seq_len, num_chains, concentration, seed, rule)


def sorted_values(vocab_size: int = 4, seq_len: int = 7, num_chains: int = 2, concentration: float = 0.5,
                  seed: int = 0) -> Joint:
  """Sequences of a Markov-chain mixture sorted into non-decreasing order under a seeded
  permutation of the values (a global order): the law of the sorted sequence, summed exactly."""
  _check_positive(vocab_size=vocab_size, seq_len=seq_len, num_chains=num_chains)
  _check_enumerable(vocab_size, seq_len)
  rng = np.random.default_rng(seed)
  order = rng.permutation(vocab_size)  # order[k]: the value ranked k
  rank = np.argsort(order)
  base = _head(vocab_size, seq_len, rng, num_chains, concentration)
  sorted_rows = order[np.sort(rank[base.support], axis=1)]
  weights = vocab_size ** np.arange(seq_len - 1, -1, -1)
  probs = np.bincount(sorted_rows.astype(np.int64) @ weights, weights=base.probs, minlength=len(base.probs))
  return _normalised(base.support, probs, vocab_size)


def balanced(vocab_size: int = 3, seq_len: int = 6, num_chains: int = 2, concentration: float = 0.5,
             seed: int = 0) -> Joint:
  """A Markov-chain mixture conditioned on fixed counts of every value (a seeded composition of
  ``seq_len`` with every value at least once when ``seq_len >= vocab_size``)."""
  _check_positive(vocab_size=vocab_size, seq_len=seq_len, num_chains=num_chains)
  _check_enumerable(vocab_size, seq_len)
  rng = np.random.default_rng(seed)
  counts = np.ones(vocab_size, np.int64) if seq_len >= vocab_size else np.zeros(vocab_size, np.int64)
  counts += np.bincount(rng.integers(vocab_size, size=seq_len - int(counts.sum())), minlength=vocab_size)
  base = _head(vocab_size, seq_len, rng, num_chains, concentration)
  ok = np.all(np.stack([(base.support == v).sum(1) for v in range(vocab_size)], 1) == counts, axis=1)
  return _normalised(base.support, np.where(ok, base.probs, 0.0), vocab_size)


FAMILIES = ("markov1", "markov2", "markov3", "hmm", "sum_rule", "copy_permutation")
# (vocab_size, seq_len) pairs the benchmark draws from: every one has at most 5 ** 6 sequences.
SIZES = ((3, 6), (3, 7), (3, 8), (4, 5), (4, 6), (5, 5))


def draw_joint(seed: int, family: str = "", vocab_size: int = 0, seq_len: int = 0):
  """A benchmark joint drawn from ``seed``: its family (cycling through ``FAMILIES`` unless
  given), size (from ``SIZES`` unless given) and parameters. Returns (name, Joint)."""
  rng = np.random.default_rng([int(seed), 7])
  family = family or FAMILIES[int(seed) % len(FAMILIES)]
  v, l = SIZES[int(rng.integers(len(SIZES)))]  # drawn always: the parameters below do not shift
  vocab_size, seq_len = vocab_size or v, seq_len or l
  sub = int(rng.integers(2**31))
  if family.startswith("markov"):
    order = int(family[len("markov"):] or 1)
    joint = markov_order_mixture(vocab_size, seq_len, int(rng.integers(2, 4)), order, 0.3, sub)
  elif family == "hmm":
    joint = hidden_markov(vocab_size, seq_len, int(rng.integers(2, 5)), 0.3, sub)
  elif family == "sum_rule":
    joint = sum_rule(vocab_size, seq_len, 2, 0.5, sub)
  elif family == "copy_permutation":
    joint = copy_permutation(vocab_size, seq_len, 2, 0.5, sub)
  elif family in GLOBAL:
    joint = GLOBAL[family](vocab_size, seq_len, 2, 0.5, sub)
  else:
    raise ValueError(f"unknown joint family {family!r}; choose one of {FAMILIES + tuple(GLOBAL)}")
  return f"{family}_v{vocab_size}_l{seq_len}_s{seed}", joint


# Joints with global constraints, at the sizes of a user's small token table (L 6 to 8, V 3 to 5).
GLOBAL = {"weighted_sum": weighted_sum, "sorted": sorted_values, "count": count_code, "balanced": balanced}
GLOBAL_FAMILIES = tuple(GLOBAL) + ("markov1",)
GLOBAL_SIZES = ((3, 6), (3, 7), (3, 8), (4, 6), (4, 7), (5, 6))


def draw_global_joint(seed: int, family: str = ""):
  """``draw_joint`` over ``GLOBAL_FAMILIES`` (cycled by seed unless given) at a size drawn from
  ``GLOBAL_SIZES``. Returns (name, Joint)."""
  family = family or GLOBAL_FAMILIES[int(seed) % len(GLOBAL_FAMILIES)]
  v, l = GLOBAL_SIZES[int(np.random.default_rng([int(seed), 11]).integers(len(GLOBAL_SIZES)))]
  return draw_joint(seed, family, v, l)
