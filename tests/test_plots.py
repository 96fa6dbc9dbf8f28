"""Quality-against-steps plots from results.json (both row formats), and their errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dimo_jax.evaluation import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (1, 2, 4, 8, 16)


def _evaluate_results():
  """Rows as mode=evaluate writes them: two teacher samplers, the generator at two temperatures,
  two real-data rows (without steps)."""
  rows = []
  for sampler, base in (("confidence", 150.0), ("ancestral", 170.0)):
    for s in STEPS:
      rows.append(dict(name=f"teacher_{sampler}_{s}", model="teacher", sampler=sampler, steps=s, temperature=1.0,
                       label=f"Teacher ({sampler})", num_samples=100, ms_per_sample=0.1 * s,
                       fd_pixel=base / s ** 0.5, precision=0.5 + 0.02 * s, prdc_features="pixels"))
  rows[3]["ms_per_sample"] = None  # confidence at 8 steps without a time: on the steps axis only
  for t in (1.0, 1.2):
    rows.append(dict(name=f"generator_t{t}", model="generator", steps=1, temperature=t, label=f"Di[M]O (T={t:g})",
                     num_samples=100, ms_per_sample=0.09, fd_pixel=60.0 * t, precision=0.7))
  rows.append(dict(name="real_train", model="real", label="Real data (train split)", steps=None,
                   ms_per_sample=None, fd_pixel=20.0, precision=0.9))
  rows.append(dict(name="real_halves", model="real", label="Real data (two halves)", steps=None,
                   ms_per_sample=None, fd_pixel=18.0))
  return {"title": "Model", "rows": rows, "num_samples": 100}


def _write(tmp_path, results, name="results.json"):
  path = tmp_path / name
  path.write_text(json.dumps(results))
  return str(path)


def _lines(ax):
  """(teacher curves, generator points, horizontal real-data lines) on one axis."""
  curves = [l for l in ax.get_lines() if l.get_marker() == "o"]
  stars = [l for l in ax.get_lines() if l.get_marker() == "*"]
  flat = [l for l in ax.get_lines() if l.get_linestyle() == ":"]
  return curves, stars, flat


def test_evaluate_rows_curves_points_and_png(tmp_path):
  path = _write(tmp_path, _evaluate_results())
  out = tmp_path / "plot.png"
  fig = plots.plot_results(json.load(open(path)), str(out))
  with Image.open(out) as im:
    assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 500
  axes = np.array(fig.axes).reshape(2, 2)  # fd_pixel, precision x (steps, ms)
  assert [a.get_ylabel() for a in axes[:, 0]] == ["FD-pixel ↓", "precision ↑"]
  steps_ax, ms_ax = axes[0]
  curves, stars, flat = _lines(steps_ax)
  assert sorted(c.get_label() for c in curves) == ["teacher (ancestral)", "teacher (confidence)"]
  for c in curves:
    assert list(c.get_xdata()) == list(STEPS)
  conf = next(c for c in curves if "confidence" in c.get_label())
  np.testing.assert_allclose(conf.get_ydata(), [150.0 / s ** 0.5 for s in STEPS])
  assert len(stars) == 2 and all(list(s.get_xdata()) == [1] for s in stars)
  assert sorted(float(s.get_ydata()[0]) for s in stars) == [60.0, 72.0]
  assert len(flat) == 2 and sorted(float(l.get_ydata()[0]) for l in flat) == [18.0, 20.0]
  assert steps_ax.get_xscale() == "log" and steps_ax.xaxis.get_transform().base == 2
  # The ms axis: the teacher row without a time is left out; the generator is at its ms.
  curves, stars, _ = _lines(ms_ax)
  conf = next(c for c in curves if "confidence" in c.get_label())
  np.testing.assert_allclose(conf.get_xdata(), [0.1, 0.2, 0.4, 1.6])
  assert len(stars) == 2 and all(float(s.get_xdata()[0]) == 0.09 for s in stars)
  # precision: one real row has it.
  assert len(_lines(axes[1, 0])[2]) == 1


def test_prompt_following_rows(tmp_path):
  def scores(acc, fd, n):
    return {name: {"prompt_acc": acc, "fd_pixel": fd, "samples": n} for name in ("seen", "held_out")}
  rows = [{"model": "real digits", "steps": 0, "scores": scores(99.8, 0.0, 50)}]
  rows += [{"model": "teacher (Meissonic sampler)", "steps": s, "scores": scores(85 + s, 100 + s, 50),
            "seconds": 0.5 * s} for s in (1, 2, 4)]
  rows.append({"model": "Di[M]O generator", "steps": 1, "scores": scores(90.0, 111.0, 50)})
  fig = plots.plot_results({"rows": rows}, str(tmp_path / "p.png"), metrics=["prompt_acc"])
  steps_ax, ms_ax = fig.axes
  curves, stars, flat = _lines(steps_ax)
  assert sorted(c.get_label() for c in curves) == ["teacher (Meissonic sampler) (held-out)",
                                                   "teacher (Meissonic sampler) (seen)"]
  assert all(list(c.get_ydata()) == [86, 87, 89] for c in curves)
  assert len(stars) == 2 and len(flat) == 2  # the generator and the real digits per prompt set
  curves, stars, _ = _lines(ms_ax)
  np.testing.assert_allclose(curves[0].get_xdata(), [5.0, 10.0, 20.0])  # 1000 * seconds / 100 samples
  assert stars == []  # the generator's row has no time


def test_command_line_writes_beside_results(tmp_path):
  path = _write(tmp_path, _evaluate_results())
  proc = subprocess.run([sys.executable, "-m", "dimo_jax.evaluation.plots", path, "--metrics=fd_pixel"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(tmp_path / "quality.png") and (tmp_path / "quality.png").is_file()
  assert "jax" not in proc.stderr.lower()


def test_results_without_steps_fail_clearly(tmp_path):
  res = _evaluate_results()
  for r in res["rows"]:
    r.pop("steps")
  path = _write(tmp_path, res)
  with pytest.raises(ValueError, match=f"{path}: no teacher or generator row has 'steps'"):
    plots.plot_file(path)
  assert plots.main([path]) == 2
  assert not (tmp_path / "quality.png").exists()
  with pytest.raises(ValueError, match="has no 'rows'"):
    plots.plot_file(_write(tmp_path, {"table": "x"}, "other.json"))
  with pytest.raises(FileNotFoundError, match="missing.json is not a file"):
    plots.plot_file(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json is not JSON"):
    plots.plot_file(str(bad))
  good = _write(tmp_path, _evaluate_results(), "good.json")
  with pytest.raises(ValueError, match="--metrics: no teacher or generator row has fid; choose among fd_pixel, "
                                       "precision"):
    plots.plot_file(good, metrics=["fid"])
  with pytest.raises(ValueError, match="--out=x.jpg: the plot is a PNG"):
    plots.plot_file(good, "x.jpg")
