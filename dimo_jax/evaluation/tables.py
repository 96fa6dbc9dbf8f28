"""The Table-1 markdown of an evaluation, Di[M]O's ratio to the teacher's best row, and the
sample grid. Token data without images adds the label-free columns of
``evaluation.token_metrics`` (sequence / position / pair TV, the teacher's bound, diversity).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from dimo_jax.data import image_grids
from dimo_jax.evaluation.entropy import format_entropy
from dimo_jax.evaluation.features import Extractors
from dimo_jax.evaluation.settings import EvalSettings

# Column key -> (header, number format). The table shows the columns some row has.
COLUMNS = (
    ("steps", "steps", "{:d}"),
    ("fid", "FID", "{:.2f}"),
    ("fd_pixel", "FD-pixel", "{:.2f}"),
    ("fd_classifier", "FD-classifier", "{:.2f}"),
    ("accuracy", "Acc", "{:.3f}"),
    ("inception_score", "IS", "{:.2f}"),
    ("precision", "Prec", "{:.3f}"),
    ("recall", "Rec", "{:.3f}"),
    ("density", "Dens", "{:.3f}"),
    ("coverage", "Cov", "{:.3f}"),
    ("tv_seq", "TV-seq", "{:.4f}"),
    ("tv_pos_mean", "TV-pos", "{:.4f}"),
    ("tv_pair_mean", "TV-pair", "{:.4f}"),
    ("tv_pair_worst", "TV-pair worst", "{:.4f}"),
    ("nll_bound", "NLL/token", "{:.3f}"),
    ("distinct", "distinct", "{:d}"),
    ("seq_entropy", "H(seq)", "{:.2f}"),
    ("top_share", "top share", "{:.3f}"),
    ("structure_broken", "rule breaks", "{:.3f}"),
    ("ms_per_sample", "ms/sample", "{:.3f}"),
)
# The distance Di[M]O's ratio to the teacher's best uses: the first that the rows have.
RATIO_METRICS = ("fid", "fd_pixel", "tv_seq", "tv_pair_mean")
METRIC_NAMES = {"fid": "FID", "fd_pixel": "FD-pixel", "tv_seq": "TV-seq", "tv_pair_mean": "mean pairwise TV"}


# ---------------------------------------------------------------------------- table
def _row_label(row: dict) -> str:
  return row.get("label") or row.get("name", "")


def format_table(results: dict) -> str:
  """The paper's Table 1 layout (markdown): one row per model / step count, the metric columns
  that some row has."""
  rows = results.get("rows", [])
  cols = [(k, h, f) for k, h, f in COLUMNS if any(r.get(k) is not None for r in rows)]
  title = results.get("title", "Model")
  lines = ["| " + " | ".join([title] + [h for _, h, _ in cols]) + " |",
           "|---|" + "---|" * len(cols)]
  for r in rows:
    cells = [_row_label(r)]
    for k, _, f in cols:
      v = r.get(k)
      if v is None:
        cells.append("-")
      elif f.endswith(":d}"):
        cells.append(f.format(int(v)))
      else:
        cells.append(f.format(float(v)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def ratio_to_teacher_best(results: dict) -> Optional[dict]:
  """Each generator row's distance over the teacher's best (lowest) over all its rows (every step
  count and sampler): the first of ``RATIO_METRICS`` the rows have (FID, FD-pixel, the sequence
  TV, the mean pairwise TV). None without both kinds of rows."""
  rows = results.get("rows", [])
  metric = next((k for k in RATIO_METRICS if any(r.get(k) is not None for r in rows)), None)
  teachers = [r for r in rows if r.get("model") == "teacher" and r.get(metric) is not None]
  generators = [r for r in rows if r.get("model") == "generator" and r.get(metric) is not None]
  if metric is None or not teachers or not generators:
    return None
  best = min(teachers, key=lambda r: r[metric])
  return {"metric": metric, "teacher_best": float(best[metric]), "teacher_best_row": best.get("name"),
          "teacher_best_label": f"{_row_label(best)}, {best.get('steps')} steps",
          "generators": {r.get("name"): float(r[metric]) / max(float(best[metric]), 1e-12) for r in generators},
          "generator_steps": {r.get("name"): r.get("steps") for r in generators}}


def ratio_note(results: dict) -> str:
  """One sentence: the generator's distance as a multiple of the teacher's best, per step count where
  it was sampled at several ("" if no ratio)."""
  ratio = ratio_to_teacher_best(results)
  if not ratio:
    return ""
  name = METRIC_NAMES[ratio["metric"]]
  steps = ratio.get("generator_steps") or {}
  several = len(set(steps.values())) > 1  # a k-step generator's rows: each ratio names its step count
  gens = ", ".join(f"{r:.2f}x" + (f" ({steps[n]} step{'s' if steps[n] != 1 else ''})" if several else "")
                   for n, r in ratio["generators"].items())
  best = f"{ratio['teacher_best']:.4f}" if ratio["metric"] in ("tv_seq", "tv_pair_mean") else \
      f"{ratio['teacher_best']:.2f}"
  return f"Di[M]O {name} over the teacher's best ({best}: {ratio['teacher_best_label']}): {gens}."


def token_note(results: dict) -> str:
  """What the token columns mean and what a model of the data would need ("" without them)."""
  tok = results.get("token_data")
  if not tok:
    return ""
  b = tok.get("baselines", {})
  lines = ["Token columns against the reference: TV-seq the exact TV between the empirical laws of whole "
           "sequences" + ("" if tok.get("enumerable") else " (not shown: the space is too large to enumerate)")
           + "; TV-pos / TV-pair the mean TV of single-position / pairwise marginals (and the worst pair); "
           "NLL/token the teacher's masked-diffusion bound on the samples (nats); H(seq) the plug-in entropy "
           "of the samples (nats)."]
  if b:
    ref_nll = tok.get("reference_nll_bound")
    lines.append(f"Training data: unigram entropy {b['unigram']:.3f} nats/token (a model ignoring the other "
                 f"positions), plug-in sequence entropy {b['plugin']:.3f} nats/token ({b['distinct']} distinct of "
                 f"{b['num']}, {b['repeat_fraction']:.0%} of sequences repeat)"
                 + (f"; the teacher's bound on the reference: {ref_nll:.3f}." if ref_nll is not None else "."))
  rules = tok.get("rules") or []
  if rules:
    lines.append(f"Structure: {len(rules)} position(s) deterministic in every training sequence "
                 f"({', '.join(r.get('kind', '') + ' ' + str(r.get('position')) for r in rules[:8])}); "
                 "'rule breaks' is the largest share of a row's samples breaking one of them.")
  return "\n".join(lines)


def _notes(results: dict) -> str:
  note = ratio_note(results)
  lines = [note] if note else []
  ref = results.get("reference", {})
  if ref:
    lines.append(f"Reference: {ref.get('name')} ({ref.get('num')} samples). Samples per row: "
                 f"{results.get('num_samples')}.")
  clf = results.get("classifier")
  if clf:
    lines.append(f"Classifier: validation accuracy {clf.get('val_accuracy'):.4f}"
                 if clf.get("val_accuracy") is not None else "Classifier: no validation split")
  tok = token_note(results)
  if tok:
    lines.append(tok)
  rows = results.get("rows", [])
  prdc = sorted({r.get("prdc_features") for r in rows if r.get("prdc_features")})
  if prdc:
    lines.append(f"Precision / recall / density / coverage (k={results.get('settings', {}).get('prdc_k', 3)}) on "
                 f"{', '.join(prdc)} features. FD-pixel: Frechet distance of the grey-level token values.")
  return "\n".join(lines)


def markdown(results: dict) -> str:
  parts = ["# Evaluation", "", format_table(results), "", _notes(results)]
  ent = results.get("entropy_shift")
  if ent and ("teacher" in ent or "generator" in ent):
    parts += ["", "## Entropy shift", "", format_entropy(ent)]
  return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- grid
def write_grid(results_sets: Dict[str, np.ndarray], order: Sequence[str], s: EvalSettings, ex: Extractors, ds,
          vocab: int, path: str) -> Optional[str]:
  names = [n for n in order if n in results_sets]
  if not names or s.grid_columns == 0:
    return None
  cols = min(s.grid_columns, min(results_sets[n].shape[0] for n in names))
  tokens = np.concatenate([results_sets[n][:cols] for n in names])
  if ex.decode is not None:
    images = ex.decode(tokens)
  elif ds is not None and ds.image_shape is not None:
    images = image_grids.tokens_to_images(tokens, vocab, ds.image_shape)
  else:
    return None
  scale = 4 if images.shape[1] <= 64 else 1
  image_grids.save_image_grid(images, path, ncols=cols, scale=scale)
  return path
