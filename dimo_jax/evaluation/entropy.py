"""The entropy-shift diagnostic: per position, how many tokens have probability above a threshold
for the teacher (one step from all masks) and for the generator (one step from x_init).
"""

from __future__ import annotations

import functools
from typing import Callable, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.core import masking, samplers
from dimo_jax.evaluation.sample_sets import Devices, map_batches
from dimo_jax.evaluation.settings import EvalSettings, r_init_value
from dimo_jax.networks import conditioning
from dimo_jax.storage import checkpoints


# ---------------------------------------------------------------------------- entropy shift
def _token_counts(logits, threshold: float, codebook: int):
  """Per position, the number of codes with probability > threshold (softmax over K codes)."""
  p = jax.nn.softmax(logits[..., :codebook].astype(jnp.float32), axis=-1)
  return jnp.sum(p > threshold, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _teacher_count_program(model, guidance: float, threshold: float) -> Callable:
  apply_fn = conditioning.make_apply_fn(model)
  null = model.null_label if model.has_null_class else None

  @jax.jit
  def counts(params, labels):
    tokens = jnp.full((labels.shape[0], model.seq_len), model.codebook_size, jnp.int32)
    logits = samplers.guided_logits(apply_fn, params, tokens, labels, guidance, null)
    return _token_counts(logits, threshold, model.codebook_size)
  return counts


@functools.lru_cache(maxsize=16)
def _generator_count_program(model, r_init, sigma: float, threshold: float) -> Callable:
  fixed, r_fn = r_init_value(r_init)

  @jax.jit
  def counts(params, key, labels):
    k_r, k_x, k_n = jax.random.split(key, 3)
    r = r_fn(k_r) if fixed is None else fixed
    x_init = masking.make_x_init(k_x, labels.shape[0], model.seq_len, model.codebook_size, r)
    logits = model.apply({"params": params}, x_init, labels, deterministic=True, noise_sigma=sigma,
                         rngs={"noise": k_n})
    return _token_counts(logits, threshold, model.codebook_size)
  return counts


def entropy_shift(teacher, generator, s: EvalSettings, sc, devices: Devices) -> dict:
  """Histograms of the per-position number of tokens with probability > threshold: the teacher
  one step from all masks (guided as in ``config.sample``), the generator one step from x_init
  (embedding noise sigma), both at temperature 1, over ``entropy_samples`` class-balanced samples.
  Each histogram equals ``metrics.entropy_shift_histogram`` of the per-position distributions."""
  out = {"threshold": s.entropy_threshold, "num_samples": s.entropy_samples}
  model = (teacher or generator)[0]
  k = model.codebook_size
  labels_all = conditioning.balanced_labels(s.entropy_samples, model.num_classes)
  batch = devices.round_batch(min(s.batch_size, s.entropy_samples))
  base = jax.random.key(int(s.seed) + 104729)
  get = (lambda key_, d: sc.get(key_, d)) if sc is not None else (lambda key_, d: d)

  def hist(fn):
    counts = map_batches(fn, labels_all, batch, devices)
    return np.bincount(np.asarray(counts).reshape(-1), minlength=k + 1).astype(np.int64)

  if teacher is not None:
    t_model, t_params = teacher[0], teacher[1]
    guidance = float(get("guidance", 1.0))
    if not t_model.has_null_class or t_model.num_classes == 0:
      guidance = 1.0
    t_prog = _teacher_count_program(t_model, guidance, float(s.entropy_threshold))
    out["teacher"] = _hist_summary(hist(lambda labels: t_prog(t_params, labels)))
  if generator is not None:
    g_model, g_params = generator[0], generator[1]
    g_prog = _generator_count_program(g_model, s.r_init, float(s.sigma), float(s.entropy_threshold))
    step = [0]

    def g_counts(labels):
      key = jax.random.fold_in(base, step[0])
      step[0] += 1
      return g_prog(g_params, key, labels)
    out["generator"] = _hist_summary(hist(g_counts))
  return out


def _hist_summary(h: np.ndarray) -> dict:
  total = int(h.sum())
  values = np.arange(h.shape[0])
  mean = float((h * values).sum() / max(total, 1))
  cdf = np.cumsum(h)
  median = int(np.searchsorted(cdf, (total + 1) / 2)) if total else 0
  return {"histogram": h.tolist(), "mean": mean, "median": median, "positions": total}


def _hist_bins(vocab: int) -> List[Tuple[int, int]]:
  """Bins of the token count: every value up to 32 tokens, else powers of two."""
  if vocab <= 32:
    return [(c, c) for c in range(0, vocab + 1)]
  bins, lo = [(0, 0), (1, 1)], 2
  while lo <= vocab:
    hi = min(2 * lo - 1, vocab)
    bins.append((lo, hi))
    lo = hi + 1
  return bins


def format_entropy(ent: dict) -> str:
  """Markdown table of the entropy-shift histograms (fraction of positions per token count)."""
  names = [n for n in ("teacher", "generator") if n in ent]
  if not names:
    return ""
  vocab = len(ent[names[0]]["histogram"]) - 1
  lines = [f"Tokens with probability > {ent['threshold']:g} per position ({ent['num_samples']} samples; "
           "teacher: one step from all masks, generator: one step from x_init)", "",
           "| tokens | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for lo, hi in _hist_bins(vocab):
    fracs = []
    for n in names:
      h = np.asarray(ent[n]["histogram"])
      fracs.append(h[lo:hi + 1].sum() / max(h.sum(), 1))
    if all(f == 0 for f in fracs):
      continue
    label = f"{lo}" if lo == hi else f"{lo}-{hi}"
    lines.append(f"| {label} | " + " | ".join(f"{f:.3f}" for f in fracs) + " |")
  lines.append("| mean | " + " | ".join(f"{ent[n]['mean']:.2f}" for n in names) + " |")
  lines.append("| median | " + " | ".join(f"{ent[n]['median']:d}" for n in names) + " |")
  return "\n".join(lines)


def save_entropy_png(ent: dict, path: str):
  """Bar chart (teacher blue, generator orange) of the entropy-shift histograms."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  names = [n for n in ("teacher", "generator") if n in ent]
  if not names:
    return
  vocab = len(ent[names[0]]["histogram"]) - 1
  bins = _hist_bins(vocab)
  fracs = {n: [np.asarray(ent[n]["histogram"])[lo:hi + 1].sum() / max(sum(ent[n]["histogram"]), 1)
               for lo, hi in bins] for n in names}
  colors = {"teacher": (31, 119, 180), "generator": (255, 127, 14)}
  bar, gap, height, margin = 10, 8, 200, 30
  width = margin * 2 + len(bins) * (bar * len(names) + gap)
  img = Image.new("RGB", (max(width, 260), height + 2 * margin + 15), "white")
  draw = ImageDraw.Draw(img)
  top = max(max(v) for v in fracs.values()) or 1.0
  for b, (lo, hi) in enumerate(bins):
    x0 = margin + b * (bar * len(names) + gap)
    for j, n in enumerate(names):
      h = int(round(fracs[n][b] / top * height))
      x = x0 + j * bar
      draw.rectangle([x, margin + height - h, x + bar - 1, margin + height], fill=colors[n])
    if len(bins) <= 20 or b % 2 == 0:
      draw.text((x0, margin + height + 3), f"{lo}" if lo == hi else f"{lo}", fill="black")
  draw.text((margin, 5), "tokens with p > {:g}: ".format(ent["threshold"]) + ", ".join(
      f"{n} ({'blue' if n == 'teacher' else 'orange'})" for n in names), fill="black")
  buf = __import__("io").BytesIO()
  img.save(buf, format="PNG")
  checkpoints.atomic_write_bytes(path, buf.getvalue())
