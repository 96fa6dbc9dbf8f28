"""Distances between token sequence sets that need no labels and no classifier.

Every function takes integer token arrays ``[N, L]`` with values in ``[0, vocab_size)``:

- ``position_tv``: total variation between the value distributions at each single position;
- ``pair_tv``: the same for the joint distribution of every pair of positions (mean and worst);
- ``sequence_tv``: the exact total variation between the two empirical laws of whole sequences
  (reported where ``vocab_size ** L`` is small enough to enumerate, ``ENUMERABLE``);
- ``diversity``: distinct sequences, plug-in entropy of the sequences, mean entropy of a
  position, the most frequent sequence's share;
- ``entropy_baselines``: what a model of the data would need (the unigram entropy per token,
  and the plug-in entropy per token of the sequences, an under-estimate when few repeat);
- ``find_structure`` / ``check_structure``: positions that are deterministic functions of
  another position or of all the others in the data, and the share of samples that break them.

``token_scores`` gathers them for one sample set against a reference set; ``teacher_report``
is what ``mode=teacher`` logs at the end (the bound per token next to the baselines, the
structure its samples break, and ``distance_to_data``: whether it is far from the data and the
budget to train with next).
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import jax
import numpy as np
from absl import logging

from dimo_jax.core import samplers
from dimo_jax.method import mdm, teacher_size

ENUMERABLE = 10**6  # vocab_size ** L up to which the exact sequence TV is reported
MAX_PAIRS = 2000  # pairs of positions scored (a fixed random subset beyond this)


def _check(tokens: np.ndarray, vocab_size: int, name: str) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"{name} must be int tokens [N, L], got shape {tokens.shape}")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"{name} holds values in [{tokens.min()}, {tokens.max()}] outside [0, {vocab_size})")
  return tokens.astype(np.int64)


def _freq(values: np.ndarray, size: int) -> np.ndarray:
  return np.bincount(values, minlength=size).astype(np.float64) / max(len(values), 1)


def position_tv(samples: np.ndarray, reference: np.ndarray, vocab_size: int) -> np.ndarray:
  """TV between the value distributions at each position: [L]."""
  a, b = _check(samples, vocab_size, "samples"), _check(reference, vocab_size, "reference")
  return np.array([0.5 * np.abs(_freq(a[:, i], vocab_size) - _freq(b[:, i], vocab_size)).sum()
                   for i in range(a.shape[1])])


def _pairs(seq_len: int, seed: int = 0) -> List[tuple]:
  pairs = list(itertools.combinations(range(seq_len), 2))
  if len(pairs) > MAX_PAIRS:
    idx = np.random.default_rng(seed).choice(len(pairs), MAX_PAIRS, replace=False)
    pairs = [pairs[i] for i in sorted(idx)]
  return pairs


def pair_tv(samples: np.ndarray, reference: np.ndarray, vocab_size: int) -> Dict[str, object]:
  """TV between the joint distributions of every pair of positions (a fixed subset of
  ``MAX_PAIRS`` when there are more): ``mean``, ``worst`` and the worst ``pair``."""
  a, b = _check(samples, vocab_size, "samples"), _check(reference, vocab_size, "reference")
  pairs = _pairs(a.shape[1])
  if not pairs:
    return {"mean": None, "worst": None, "pair": None}
  size = vocab_size * vocab_size
  tvs = np.array([0.5 * np.abs(_freq(a[:, i] * vocab_size + a[:, j], size)
                               - _freq(b[:, i] * vocab_size + b[:, j], size)).sum() for i, j in pairs])
  w = int(np.argmax(tvs))
  return {"mean": float(tvs.mean()), "worst": float(tvs[w]), "pair": list(pairs[w])}


def enumerable(vocab_size: int, seq_len: int) -> bool:
  return float(vocab_size) ** seq_len <= ENUMERABLE


def _rows(tokens: np.ndarray):
  """Unique rows and their counts."""
  if tokens.shape[0] == 0:
    return np.zeros((0, tokens.shape[1]), np.int64), np.zeros((0,), np.int64)
  return np.unique(tokens, axis=0, return_counts=True)


def sequence_tv(samples: np.ndarray, reference: np.ndarray, vocab_size: int) -> float:
  """0.5 * sum |p_a(x) - p_b(x)| over whole sequences, between the two empirical laws."""
  a, b = _check(samples, vocab_size, "samples"), _check(reference, vocab_size, "reference")
  both = np.concatenate([a, b])
  _, inverse = np.unique(both, axis=0, return_inverse=True)
  inverse = inverse.reshape(-1)
  size = int(inverse.max()) + 1 if inverse.size else 0
  pa = np.bincount(inverse[:len(a)], minlength=size) / max(len(a), 1)
  pb = np.bincount(inverse[len(a):], minlength=size) / max(len(b), 1)
  return float(0.5 * np.abs(pa - pb).sum())


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def diversity(samples: np.ndarray, vocab_size: int) -> Dict[str, float]:
  """``distinct`` sequences, their ``distinct_fraction``, the plug-in ``seq_entropy`` (nats),
  the ``position_entropy`` averaged over positions in units of log(vocab_size) (1 = uniform),
  and ``top_share``, the most frequent sequence's share (one sequence taking most of the mass:
  a collapse)."""
  a = _check(samples, vocab_size, "samples")
  _, counts = _rows(a)
  f = counts / max(counts.sum(), 1)
  pos = [_entropy(_freq(a[:, i], vocab_size)) / np.log(max(vocab_size, 2)) for i in range(a.shape[1])]
  return {"distinct": int(len(counts)), "distinct_fraction": float(len(counts) / max(len(a), 1)),
          "seq_entropy": _entropy(f), "position_entropy": float(np.mean(pos)) if pos else 0.0,
          "top_share": float(f.max()) if len(f) else 0.0}


def entropy_baselines(tokens: np.ndarray, vocab_size: int) -> Dict[str, float]:
  """What a model of ``tokens`` would need, in nats per token: ``unigram`` (each position's own
  entropy, averaged: the loss of a model that ignores the other positions) and ``plugin`` (the
  plug-in entropy of the whole sequences over L: close to the data's entropy when most
  sequences repeat, an under-estimate otherwise; ``repeat_fraction`` says how many do)."""
  a = _check(tokens, vocab_size, "tokens")
  n, seq_len = a.shape
  unigram = float(np.mean([_entropy(_freq(a[:, i], vocab_size)) for i in range(seq_len)])) if seq_len else 0.0
  _, counts = _rows(a)
  f = counts / max(n, 1)
  return {"unigram": unigram, "plugin": _entropy(f) / max(seq_len, 1),
          "repeat_fraction": float(counts[counts > 1].sum() / max(n, 1)), "distinct": int(len(counts)),
          "num": int(n)}


# ---------------------------------------------------------------------------- structure
def find_structure(tokens: np.ndarray, vocab_size: int, *, min_evidence: int = 20,
                   max_positions: int = 64) -> List[dict]:
  """Positions that are deterministic functions in every sequence of ``tokens``.

  ``{"kind": "pair", "position": j, "given": i, "table": {value_i: value_j}}``: x_j = f(x_i),
  found when x_j is not constant and each value of x_i was seen at least ``min_evidence``
  times; ``{"kind": "others", "position": i, "table": {context: value}}``: x_i = f(all other
  positions), found when at least half of the sequences share their context with another and
  at least ``min_evidence`` contexts repeat (positions already explained by a pair rule are
  skipped). Sequences longer than ``max_positions`` are not searched (returns [])."""
  a = _check(tokens, vocab_size, "tokens")
  n, seq_len = a.shape
  if n == 0 or seq_len < 2 or seq_len > max_positions:
    return []
  rules, explained = [], set()
  for j in range(seq_len):
    if len(np.unique(a[:, j])) < 2:
      continue
    for i in range(seq_len):
      if i == j:
        continue
      codes = np.unique(a[:, i] * vocab_size + a[:, j])
      values_i = codes // vocab_size
      if len(np.unique(values_i)) != len(values_i):
        continue  # some x_i value meets two x_j values
      seen = np.bincount(a[:, i], minlength=vocab_size)
      if seen[values_i].min() < min_evidence:
        continue
      rules.append({"kind": "pair", "position": j, "given": i,
                    "table": {int(c // vocab_size): int(c % vocab_size) for c in codes}})
      explained.add(j)
      break
  for i in range(seq_len):
    if i in explained or len(np.unique(a[:, i])) < 2:
      continue
    others = np.delete(a, i, axis=1)
    ctx, inverse, counts = np.unique(others, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    repeated = counts > 1
    if repeated.sum() < min_evidence or counts[repeated].sum() < n / 2:
      continue
    pair_codes = np.unique(inverse * vocab_size + a[:, i])
    if len(pair_codes) != len(ctx):
      continue  # some context meets two values
    table = {tuple(int(v) for v in ctx[c // vocab_size]): int(c % vocab_size) for c in pair_codes}
    rules.append({"kind": "others", "position": i, "table": table})
  return rules


def check_structure(rules: List[dict], samples: np.ndarray) -> List[dict]:
  """For each rule, the share of ``samples`` that break it among those it applies to (pair
  rules: x_i among the values seen in the data; context rules: contexts seen in the data)."""
  a = np.asarray(samples, np.int64)
  out = []
  for rule in rules:
    j = rule["position"]
    if rule["kind"] == "pair":
      i = rule["given"]
      lookup = rule["table"]
      applies = np.array([v in lookup for v in a[:, i]], bool)
      broken = np.array([lookup.get(int(v), -1) != int(w) for v, w in zip(a[:, i], a[:, j])], bool) & applies
      what = f"x{j} = f(x{i})"
    else:
      others = np.delete(a, j, axis=1)
      expect = np.array([rule["table"].get(tuple(int(v) for v in row), -1) for row in others])
      applies = expect >= 0
      broken = applies & (expect != a[:, j])
      what = f"x{j} = f(other positions)"
    n = int(applies.sum())
    out.append({"rule": what, "kind": rule["kind"], "position": j, "applies": n,
                "broken": float(broken.sum() / n) if n else 0.0})
  return out


def structure_summary(rules: List[dict], samples: np.ndarray) -> Optional[float]:
  """The largest share of samples breaking one rule (None without rules)."""
  if not rules:
    return None
  return max(c["broken"] for c in check_structure(rules, samples))


# ---------------------------------------------------------------------------- one set
def token_scores(samples: np.ndarray, reference: np.ndarray, vocab_size: int,
                 rules: Optional[List[dict]] = None) -> Dict[str, object]:
  """The label-free scores of ``samples`` against ``reference`` (both [N, L] tokens):
  ``tv_pos_mean`` / ``tv_pos_worst``, ``tv_pair_mean`` / ``tv_pair_worst`` / ``tv_pair_at``,
  ``tv_seq`` (enumerable spaces only), the ``diversity`` fields and ``structure_broken`` (the
  worst rule's share of breaking samples, when ``rules`` are given)."""
  pos = position_tv(samples, reference, vocab_size)
  pairs = pair_tv(samples, reference, vocab_size)
  out: Dict[str, object] = {"tv_pos_mean": float(pos.mean()), "tv_pos_worst": float(pos.max()),
                            "tv_pair_mean": pairs["mean"], "tv_pair_worst": pairs["worst"],
                            "tv_pair_at": pairs["pair"]}
  if enumerable(vocab_size, np.asarray(samples).shape[1]):
    out["tv_seq"] = sequence_tv(samples, reference, vocab_size)
  out.update(diversity(samples, vocab_size))
  if rules:
    out["structure_broken"] = structure_summary(rules, samples)
  return out


# ---------------------------------------------------------------------------- the teacher's report
GAP_TOLERANCE = 0.05  # nats per token of bound above the plug-in entropy that count as far from the data


def teacher_report(apply_fn, params, train_tokens: np.ndarray, val_tokens: np.ndarray, *, vocab_size: int,
                   mask_id: int, null_label: int, key, num_samples: int = 2000, batch_size: int = 500,
                   tolerance: float = 0.01, budget_flops: Optional[float] = None,
                   sizes: Optional[dict] = None) -> dict:
  """The teacher's bound on the validation tokens (nats per token, ``mdm.nll_bound``) next to
  what a model of the data would need (``entropy_baselines`` of the training tokens), and the
  structure of the training data (``find_structure``) checked on ``num_samples`` ancestral
  samples at one token per step. ``warnings`` lists every rule broken by more than
  ``tolerance`` of the samples (also logged).

  ``gap`` is the bound minus the plug-in entropy (``None`` when fewer than half the training
  sequences repeat: the plug-in is then too low to compare). ``far`` is true when a rule breaks
  or the gap exceeds ``GAP_TOLERANCE``; then ``next_budget`` is the flag to train with next
  (twice ``budget_flops``: ``method.teacher_size.next_budget``), logged with the sizes the run
  had (``sizes``, kept in the report)."""
  train_tokens = np.asarray(train_tokens, np.int32)
  val = np.asarray(val_tokens, np.int32)
  k_nll, k_sample = jax.random.split(key)
  out = {"baselines": entropy_baselines(train_tokens, vocab_size)}
  if val.shape[0]:
    out["val_nll_bound"] = float(mdm.nll_bound(apply_fn, params, val, None, mask_id=mask_id,
                                               null_label=null_label, key=k_nll).mean())
  rules = find_structure(train_tokens, vocab_size)
  out["rules"] = len(rules)
  out["warnings"] = []
  if rules and num_samples > 0:
    seq_len = train_tokens.shape[1]
    sample = jax.jit(lambda p, k, labels: samplers.ancestral_sampler(
        apply_fn, p, k, labels, seq_len=seq_len, codebook_size=mask_id, steps=seq_len))
    chunks = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
      labels = np.full((batch_size,), null_label, np.int32)
      chunks.append(np.asarray(jax.device_get(sample(params, jax.random.fold_in(k_sample, i), labels))))
    tokens = np.concatenate(chunks)[:num_samples]
    checks = check_structure(rules, tokens)
    out["structure"] = checks
    for c in checks:
      if c["broken"] > tolerance:
        msg = (f"the teacher's samples break structure the data always holds: {c['rule']} holds in all "
               f"{train_tokens.shape[0]} training sequences, and {c['broken']:.1%} of {c['applies']} samples "
               f"(ancestral, {seq_len} steps) break it; train longer or a larger model before distilling")
        out["warnings"].append(msg)
        logging.warning("%s", msg)
  b = out["baselines"]
  logging.info("Teacher bound on the validation tokens: %s nats/token; the data: unigram entropy %.4f, plug-in "
               "sequence entropy %.4f nats/token (%d distinct of %d, %.0f%% of sequences repeat).",
               f"{out['val_nll_bound']:.4f}" if "val_nll_bound" in out else "-", b["unigram"], b["plugin"],
               b["distinct"], b["num"], 100 * b["repeat_fraction"])
  out.update(distance_to_data(out, tolerance=tolerance, budget_flops=budget_flops, sizes=sizes))
  if out["far"]:
    logging.warning("%s", out["advice"])
  return out


def distance_to_data(report: dict, *, tolerance: float = 0.01, budget_flops: Optional[float] = None,
                     sizes: Optional[dict] = None) -> dict:
  """How far a teacher is from its data, from ``teacher_report``'s fields: ``gap`` (bound minus
  plug-in entropy, nats per token; None without the bound or when fewer than half the sequences
  repeat), ``worst_broken`` (the largest share of samples breaking one rule), ``far`` and, when
  far, ``next_budget`` (the flag to try: twice ``budget_flops``, or twice the steps without a
  budget) and ``advice`` (one line naming what is off and that flag)."""
  b = report["baselines"]
  bound = report.get("val_nll_bound")
  gap = None if bound is None or b["repeat_fraction"] < 0.5 else float(bound - b["plugin"])
  worst = max((c["broken"] for c in report.get("structure", [])), default=None)
  reasons = []
  if worst is not None and worst > tolerance:
    reasons.append(f"{worst:.1%} of its samples break a rule every training sequence holds")
  if gap is not None and gap > GAP_TOLERANCE:
    reasons.append(f"its bound is {gap:.3f} nats/token above the data's plug-in entropy {b['plugin']:.3f}")
  out = {"gap": gap, "worst_broken": worst, "far": bool(reasons), "tolerance": tolerance,
         "gap_tolerance": GAP_TOLERANCE, "budget_flops": budget_flops, "sizes": dict(sizes or {})}
  if reasons:
    had = sizes or {}
    was = (f" (this run: width {had.get('width')}, depth {had.get('depth')}, {had.get('trained')} of "
           f"{had.get('steps')} steps)") if had else ""
    if budget_flops is not None:
      flag = teacher_size.next_budget(budget_flops)
      todo = (f"Train it again with twice the budget, {flag}, which sizes a larger model and more steps (or set "
              f"--config.model.width / --config.train.steps)")
    else:  # every size was given: the budget sizes nothing
      flag = f"--config.train.steps={2 * int(had['steps'])}" if had.get("steps") else "--config.train.steps"
      todo = f"Train it again longer ({flag}) or with a larger --config.model.width / --config.model.depth"
    out["next_budget"] = flag
    out["advice"] = f"The teacher is far from its data: {'; '.join(reasons)}{was}. {todo}."
  return out
