"""Quality against sampling steps and against time per sample, drawn from an evaluation's
``results.json``.

Two row formats are read:

- ``mode=evaluate`` (``modes/evaluate.py``): one row per sample set with ``model`` (``teacher``,
  ``generator`` or ``real``), ``steps``, ``sampler`` (teacher rows), ``temperature`` (generator rows),
  ``ms_per_sample`` and the metrics at the top level (``fid``, ``fd_pixel``, ``tv_seq``, ...);
- the prompt-following table (``configs/captioned_digits.py``): ``model`` (``teacher (...)``,
  ``Di[M]O generator``, ``real digits``), ``steps``, ``seconds`` (teacher rows) and ``scores`` per
  prompt set (``seen``, ``held_out``), each with ``prompt_acc``, ``fd_pixel``, ... .

The figure has one line of two panels per quality metric: the metric against the number of steps
(log2 axis) and against milliseconds per sample (a log axis where the times span a factor of 10,
else linear; rows without a time are left out there; a prompt-following row's time is its wall
time over its samples, compilation and scoring included), one curve per teacher sampler (and
prompt set), the generator's point(s) as stars (each labelled with its step count where the generator
was sampled at several) and the real-data rows as dotted horizontal lines.

Command line (any finished evaluation)::

  python -m dimo_jax.evaluation.plots <workdir>/eval/results.json [--out=<png>] [--metrics=fid,fd_pixel]

It writes ``quality.png`` beside ``results.json`` unless ``--out`` names another file, and prints
the path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

# Row keys that are not quality metrics.
_NOT_METRICS = {"name", "model", "label", "steps", "sampler", "temperature", "num_samples", "ms_per_sample",
                "seconds", "samples", "scores", "prdc_features", "distinct"}
# Axis labels; the arrow says which way is better.
METRIC_LABELS = {
    "fid": "FID ↓", "fd_pixel": "FD-pixel ↓", "fd_classifier": "FD-classifier ↓", "accuracy": "accuracy ↑",
    "inception_score": "Inception score ↑", "precision": "precision ↑", "recall": "recall ↑",
    "density": "density ↑", "coverage": "coverage ↑", "tv_seq": "TV (sequences) ↓", "tv_pos_mean": "TV (positions) ↓",
    "tv_pair_mean": "TV (pairs, mean) ↓", "tv_pair_worst": "TV (pairs, worst) ↓", "nll_bound": "NLL bound / token",
    "seq_entropy": "H(sequences)", "top_share": "top sequence's share", "structure_broken": "rule breaks ↓",
    "prompt_acc": "prompt accuracy % ↑", "digit_acc": "digit % ↑", "thickness_acc": "thickness % ↑",
    "slant_acc": "slant % ↑", "diversity": "diversity / prompt",
}
DEFAULT_NAME = "quality.png"


@dataclass
class Point:
  """One scored sample set: ``kind`` is ``teacher``, ``generator`` or ``real``; ``curve`` names the
  teacher curve (sampler, prompt set) or the generator's point."""
  kind: str
  curve: str
  steps: Optional[int]
  ms: Optional[float]
  metrics: Dict[str, float] = field(default_factory=dict)


def _number(v) -> Optional[float]:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v) if math.isfinite(float(v)) else None


def _kind(model: str) -> str:
  m = str(model).lower()
  if m.startswith("teacher"):
    return "teacher"
  if m.startswith(("generator", "di[m]o")):
    return "generator"
  return "real"


def points(results: dict, source: str = "results.json") -> List[Point]:
  """The rows of ``results`` (either format) as ``Point``s. Raises ``ValueError`` naming ``source``
  when it holds no rows or no teacher / generator row has a number of steps."""
  rows = results.get("rows") if isinstance(results, dict) else None
  if not isinstance(rows, list) or not rows:
    raise ValueError(f"{source} has no 'rows'; plot the results.json that mode=evaluate writes "
                     "(<workdir>/eval/results.json)")
  out = []
  for r in rows:
    if not isinstance(r, dict):
      raise ValueError(f"{source}: a row is {type(r).__name__}, not an object; pass a results.json of mode=evaluate")
    kind = _kind(r.get("model", ""))
    steps = r.get("steps")
    steps = int(steps) if _number(steps) is not None and kind != "real" else None
    if isinstance(r.get("scores"), dict):  # prompt-following rows: one point per prompt set
      n = sum(int(s.get("samples", 0)) for s in r["scores"].values() if isinstance(s, dict))
      seconds = _number(r.get("seconds"))
      ms = 1000.0 * seconds / n if seconds is not None and n else None
      for name, s in r["scores"].items():
        if isinstance(s, dict):
          metrics = {k: _number(v) for k, v in s.items() if k not in _NOT_METRICS and _number(v) is not None}
          out.append(Point(kind, f"{r.get('model', kind)} ({name.replace('_', '-')})", steps, ms, metrics))
      continue
    if kind == "teacher":
      curve = f"teacher ({r['sampler']})" if r.get("sampler") else (r.get("label") or "teacher")
    else:
      curve = r.get("label") or r.get("name") or kind
    metrics = {k: _number(v) for k, v in r.items() if k not in _NOT_METRICS and _number(v) is not None}
    out.append(Point(kind, curve, steps, _number(r.get("ms_per_sample")), metrics))
  if not any(p.steps is not None for p in out if p.kind != "real"):
    raise ValueError(f"{source}: no teacher or generator row has 'steps', so quality cannot be drawn against "
                     "the number of steps; pass a results.json of mode=evaluate")
  return out


def quality_metrics(pts: Sequence[Point], wanted: Sequence[str] = ()) -> List[str]:
  """The metrics to draw: ``wanted`` (each must occur in a teacher or generator row) or every metric
  some teacher or generator row has, in the table's order."""
  have = []
  for p in pts:
    if p.kind != "real":
      have += [k for k in p.metrics if k not in have]
  order = list(METRIC_LABELS)
  have.sort(key=lambda k: order.index(k) if k in order else len(order))
  if not wanted:
    return have
  missing = [k for k in wanted if k not in have]
  if missing:
    raise ValueError(f"--metrics: no teacher or generator row has {', '.join(missing)}; choose among "
                     f"{', '.join(have)}")
  return list(wanted)


def teacher_curves(pts: Sequence[Point], metric: str, x: str) -> Dict[str, List[Tuple[float, float]]]:
  """``{curve: [(x, value), ...]}`` of the teacher rows, sorted by x (``x``: ``steps`` or ``ms``)."""
  curves: Dict[str, List[Tuple[float, float]]] = {}
  for p in pts:
    xv = p.steps if x == "steps" else p.ms
    if p.kind == "teacher" and xv is not None and metric in p.metrics:
      curves.setdefault(p.curve, []).append((float(xv), p.metrics[metric]))
  return {k: sorted(v) for k, v in curves.items()}


def _spans_decade(pts: Sequence[Point], metric: str) -> bool:
  """Whether the times of the rows with ``metric`` span a factor of 10 or more (a log axis then)."""
  ms = [p.ms for p in pts if p.ms and p.kind != "real" and metric in p.metrics]
  return bool(ms) and max(ms) >= 10 * min(ms)


def plot_results(results: dict, out: str, metrics: Sequence[str] = (), source: str = "results.json",
                 title: str = ""):
  """Draws ``results`` (module docstring) into the PNG ``out`` (written atomically) and returns the
  matplotlib figure: per metric an axis against steps, then one against ms per sample."""
  pts = points(results, source)
  names = quality_metrics(pts, metrics)
  if not names:
    raise ValueError(f"{source}: the teacher and generator rows hold no metric to draw")
  # pylint: disable=import-outside-toplevel
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import ticker
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 3.2 * len(names)), layout="constrained")
  axes = fig.subplots(len(names), 2, squeeze=False)
  colours = {}
  # A generator sampled at several step counts (a k-step generator's rows): each star names its count.
  generator_steps = {}
  for p in pts:
    if p.kind == "generator" and p.steps is not None:
      generator_steps[p.curve] = len({q.steps for q in pts if q.kind == "generator" and q.curve == p.curve})
  # Prompt-following rows time the whole row (sampling, compilation and scoring).
  ms_label = "ms per sample" + (" (row wall time / samples)" if any(
      isinstance(r, dict) and "seconds" in r for r in results["rows"]) else "")
  for row, metric in zip(axes, names):
    for ax, x in zip(row, ("steps", "ms")):
      for curve, xy in teacher_curves(pts, metric, x).items():
        colour = colours.setdefault(curve, f"C{len(colours) % 10}")
        ax.plot(*zip(*xy), marker="o", color=colour, label=curve)
      starred = set()
      for p in pts:
        xv = p.steps if x == "steps" else p.ms
        if p.kind == "generator" and xv is not None and metric in p.metrics:
          colour = colours.setdefault(p.curve, f"C{len(colours) % 10}")
          ax.plot([xv], [p.metrics[metric]], marker="*", markersize=14, linestyle="none", color=colour,
                  label=p.curve if p.curve not in starred else f"_{p.curve}")
          starred.add(p.curve)
          if p.steps is not None and generator_steps.get(p.curve, 1) > 1:
            ax.annotate(f"{p.steps} step{'s' if p.steps > 1 else ''}", (xv, p.metrics[metric]),
                        textcoords="offset points", xytext=(6, 6), fontsize=7, color=colour)
        elif p.kind == "real" and metric in p.metrics:
          ax.axhline(p.metrics[metric], linestyle=":", color="grey", linewidth=1, label=p.curve)
      if x == "steps" or _spans_decade(pts, metric):
        ax.set_xscale("log", base=2 if x == "steps" else 10)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
      ax.set_xlabel("sampling steps" if x == "steps" else ms_label)
      ax.set_ylabel(METRIC_LABELS.get(metric, metric))
      ax.grid(True, alpha=0.3)
    row[0].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, format="png", dpi=100)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return fig


def plot_file(path: str, out: str = "", metrics: Sequence[str] = ()) -> str:
  """Reads the ``results.json`` at ``path`` and writes its plot to ``out`` (default:
  ``quality.png`` beside it); returns the PNG's path. ``FileNotFoundError`` / ``ValueError`` name
  the file and what to pass instead."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is not a file; pass the results.json of a finished evaluation "
                            "(<workdir>/eval/results.json)")
  try:
    with open(path) as f:
      results = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not JSON ({e}); pass the results.json that mode=evaluate writes") from None
  out = out or os.path.join(os.path.dirname(os.path.abspath(path)), DEFAULT_NAME)
  if not out.lower().endswith(".png"):
    raise ValueError(f"--out={out}: the plot is a PNG; give a file name ending in .png")
  plot_results(results, out, metrics, source=path, title=os.path.abspath(path))
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dimo_jax.evaluation.plots",
                                   description="Plot quality against steps and ms per sample from a results.json.")
  parser.add_argument("results", help="the results.json of mode=evaluate (<workdir>/eval/results.json)")
  parser.add_argument("--out", default="", help=f"the PNG to write (default: {DEFAULT_NAME} beside results.json)")
  parser.add_argument("--metrics", default="", help="comma-separated metrics to draw (default: every one found)")
  args = parser.parse_args(argv)
  wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
  try:
    print(plot_file(args.results, args.out, wanted))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
