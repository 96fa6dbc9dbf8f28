"""A teacher sized to the user's data: the transformer's width, depth, heads, MLP and the step
count chosen from the data (N sequences of length L over V values) within a compute budget.

``parse_budget`` reads ``config.train.budget``: wall-clock minutes (``"5min"``, converted to FLOPs
at ``FLOPS_PER_SECOND``, what a 2-core CPU sustains on these small transformers) or FLOPs
(``"2e13"``). ``choose`` picks the largest model of ``LADDER`` that (a) has no more parameters
than ``PARAMS_PER_TOKEN`` times the training tokens (a small table gets a small model) and (b)
still trains ``MIN_STEPS`` steps within the budget (or ``MAX_EPOCHS`` passes over the data, when
that is fewer steps); the step count is what the budget then pays for. Steps come before width: on
constraint-heavy data the same budget spent on twice the steps of a smaller model learned more
(docs/proofs.md, section 11). Values the user gave (non-zero) are kept. Pure Python.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional

FLOPS_PER_SECOND = 25e9  # a 2-core CPU on a width-64..256 transformer, training step (docs/proofs.md, section 11)
PARAMS_PER_TOKEN = 4.0  # at most this many parameters per training token
MIN_STEPS = 6000  # a model that cannot train this long within the budget is too large for it
# (or as long as MAX_EPOCHS passes allow, when that is shorter)
MAX_EPOCHS = 100  # a small table is not passed over more often than this
# (width, depth): the candidates, smallest first; heads = width // 64 (at least 4), mlp = 4 * width.
LADDER = ((32, 2), (64, 2), (96, 3), (128, 3), (192, 4), (256, 4), (384, 6), (512, 8), (768, 12), (1024, 16))
BUDGET_HELP = 'give wall-clock minutes like "5min" or FLOPs like "2e13"'


def parse_budget(value) -> Optional[float]:
  """FLOPs of ``config.train.budget``: ``"<m>min"`` (minutes at ``FLOPS_PER_SECOND``) or a number
  of FLOPs (``"2e13"``, or a number); ``""`` / ``"auto"`` / None: None (no budget). A value that is
  neither, or not positive, raises ValueError naming the key and the fix."""
  if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none")):
    return None
  if isinstance(value, bool):
    raise ValueError(f"config.train.budget={value!r}: {BUDGET_HELP}")
  if isinstance(value, (int, float)):
    flops = float(value)
  else:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(min|m|flops)?\s*", str(value))
    if not m:
      raise ValueError(f"config.train.budget={value!r} is not a budget; {BUDGET_HELP}")
    number = float(m.group(1))
    flops = number * 60.0 * FLOPS_PER_SECOND if m.group(2) in ("min", "m") else number
  if not math.isfinite(flops) or flops <= 0:
    raise ValueError(f"config.train.budget={value!r} must be positive; {BUDGET_HELP}")
  return flops


def minutes(flops: float) -> float:
  """Wall-clock minutes of ``flops`` at ``FLOPS_PER_SECOND``."""
  return flops / FLOPS_PER_SECOND / 60.0


def param_count(width: int, depth: int, mlp_dim: int, vocab_size: int, seq_len: int, num_classes: int = 0) -> int:
  """Parameters of ``networks.maskgit``'s pre-LN transformer (to within its norms and biases)."""
  blocks = depth * (4 * width * width + 2 * width * mlp_dim + 4 * width + 2 * mlp_dim + 4 * width)
  io = width * (2 * (vocab_size + 1) + seq_len + 1 + num_classes + 1) + 4 * width
  return int(blocks + io)


def step_flops(width: int, depth: int, mlp_dim: int, vocab_size: int, seq_len: int, batch: int,
               num_classes: int = 0) -> float:
  """FLOPs of one training step: 6 per parameter per token (forward and backward) plus attention."""
  tokens = batch * (seq_len + 1)
  params = param_count(width, depth, mlp_dim, vocab_size, seq_len, num_classes)
  return 6.0 * params * tokens + 12.0 * depth * batch * (seq_len + 1) ** 2 * width


def _heads(width: int) -> int:
  return max(4, width // 64)


def choose(num_train: int, seq_len: int, vocab_size: int, *, batch: int, budget_flops: Optional[float],
           width: int = 0, depth: int = 0, heads: int = 0, mlp_dim: int = 0, steps: int = 0,
           num_classes: int = 0) -> Dict[str, object]:
  """The teacher's ``width``, ``depth``, ``heads``, ``mlp_dim`` and ``steps`` for ``num_train``
  sequences of ``seq_len`` tokens over ``vocab_size`` values at ``batch``, within
  ``budget_flops`` (None: no budget, and then width, depth and steps must be given).

  Non-zero arguments are the user's and are kept. Returns those fields, the estimated
  ``params``, ``flops`` and ``minutes`` of the run, and ``why`` (one line for the log)."""
  if min(num_train, seq_len, vocab_size, batch) < 1:
    raise ValueError(f"the data has {num_train} training sequences of length {seq_len} over {vocab_size} values "
                     f"(batch {batch}); a teacher needs at least one of each")
  auto = [k for k, v in (("model.width", width), ("model.depth", depth), ("train.steps", steps)) if not v]
  if auto and budget_flops is None:
    raise ValueError(f"{', '.join('config.' + k for k in auto)} = 0 (sized to the data) needs config.train.budget; "
                     f"{BUDGET_HELP}, or set the values")
  cap = PARAMS_PER_TOKEN * num_train * seq_len
  max_steps = max(1, MAX_EPOCHS * num_train // batch)
  min_steps = 1 if steps else min(MIN_STEPS, max_steps)

  def candidate(w, d):
    w, d = width or w, depth or d
    h = heads or _heads(w)
    if w % h:
      h = heads or math.gcd(w, h)
    m = mlp_dim or 4 * w
    per_step = step_flops(w, d, m, vocab_size, seq_len, batch, num_classes)
    n = steps or int(min(max_steps, budget_flops // per_step))
    return dict(width=w, depth=d, heads=h, mlp_dim=m, steps=n,
                params=param_count(w, d, m, vocab_size, seq_len, num_classes), flops=per_step * n)

  options = [candidate(w, d) for w, d in LADDER]
  fits = [c for c in options
          if (budget_flops is None or c["flops"] <= budget_flops * (1 + 1e-9))
          and c["steps"] >= min_steps and c["params"] <= max(cap, options[0]["params"])]
  chosen = dict(fits[-1] if fits else options[0])
  if chosen["steps"] < 1:
    raise ValueError(f"config.train.budget allows no step of the smallest model ({chosen['width']} x "
                     f"{chosen['depth']}); raise it ({BUDGET_HELP})")
  chosen["minutes"] = minutes(chosen["flops"])
  given = ", ".join(f"{k}={v}" for k, v in (("width", width), ("depth", depth), ("heads", heads),
                                             ("mlp_dim", mlp_dim), ("steps", steps)) if v) or "nothing"
  budget = "none" if budget_flops is None else f"{budget_flops:.3g} FLOPs (~{minutes(budget_flops):.1f} min)"
  chosen["why"] = (f"{num_train} training sequences of length {seq_len} over {vocab_size} values, budget {budget}, "
                   f"given {given}: width {chosen['width']}, depth {chosen['depth']}, heads {chosen['heads']}, "
                   f"mlp {chosen['mlp_dim']} ({chosen['params']} parameters, at most {PARAMS_PER_TOKEN:g} per "
                   f"training token), {chosen['steps']} steps at batch {batch} (~{chosen['minutes']:.1f} min at "
                   f"{FLOPS_PER_SECOND:.2g} FLOP/s)")
  return chosen


DEFAULT_MINUTES = 10  # configs/tokens.py's train.budget


def next_budget(budget_flops: Optional[float], factor: float = 2.0) -> str:
  """The ``config.train.budget`` flag to try next: ``factor`` times the last one (or the default
  budget), in minutes."""
  flops = (budget_flops or DEFAULT_MINUTES * 60 * FLOPS_PER_SECOND) * factor
  return f"--config.train.budget={max(1, round(minutes(flops)))}min"
