"""A teacher sized to the data: the budget's format, the sizing rule, the noise-based early stop on
synthetic validation curves, the stored report's warning before a distillation, the joints with
global constraints, and one tiny `mode=teacher` run with every size left to the data."""
import itertools
import json
from unittest import mock

import numpy as np
import pytest

from configs import tokens as tokens_config
from conftest import load_script
from dimo_jax.data import joints
from dimo_jax.families import classes
from dimo_jax.method import mdm
from dimo_jax.method import teacher_size as ts


# ---------------------------------------------------------------------------- the budget
def test_parse_budget_formats_and_errors():
  assert ts.parse_budget("5min") == pytest.approx(5 * 60 * ts.FLOPS_PER_SECOND)
  assert ts.parse_budget("2e13") == pytest.approx(2e13)
  assert ts.parse_budget(" 1.5e12flops ") == pytest.approx(1.5e12)
  assert ts.parse_budget(3e12) == pytest.approx(3e12)
  assert ts.parse_budget("") is None and ts.parse_budget("auto") is None and ts.parse_budget(None) is None
  for bad in ("fast", "5 hours", "-3min", "0", True):
    with pytest.raises(ValueError, match=r"config\.train\.budget=.*\"5min\"|config\.train\.budget=.*positive"):
      ts.parse_budget(bad)


# ---------------------------------------------------------------------------- the sizing rule
FIVE_MIN = 5 * 60 * ts.FLOPS_PER_SECOND


def test_choose_grows_with_the_data_and_respects_the_budget():
  sizes = [ts.choose(n, 7, 4, batch=128, budget_flops=FIVE_MIN) for n in (300, 3000, 30000, 300000, 3000000)]
  params = [c["params"] for c in sizes]
  assert params == sorted(params) and params[0] < params[-1]
  for c in sizes:
    assert c["flops"] <= FIVE_MIN * (1 + 1e-9)
    assert c["width"] % c["heads"] == 0 and c["mlp_dim"] == 4 * c["width"]
  # A small table gets a small model, at most PARAMS_PER_TOKEN parameters per training token.
  small = sizes[1]
  assert small["params"] <= ts.PARAMS_PER_TOKEN * 3000 * 7
  # More budget, at least as large a model and as many FLOPs.
  big = ts.choose(300000, 7, 4, batch=128, budget_flops=4 * FIVE_MIN)
  assert big["params"] >= sizes[3]["params"] and big["flops"] > sizes[3]["flops"]
  assert "300000 training sequences of length 7 over 4 values" in big["why"]


def test_choose_puts_steps_before_width():
  ten = 2 * FIVE_MIN
  # 50,000 sequences: the largest model that still trains MIN_STEPS steps, not the largest that fits.
  c = ts.choose(50000, 6, 3, batch=128, budget_flops=ten)
  assert c["steps"] >= ts.MIN_STEPS and c["flops"] <= ten * (1 + 1e-9)
  width, depth = ts.LADDER[[w for w, _ in ts.LADDER].index(c["width"]) + 1]  # the next rung
  assert ts.choose(50000, 6, 3, batch=128, budget_flops=ten, width=width, depth=depth)["steps"] < ts.MIN_STEPS
  # A small table: MAX_EPOCHS passes are fewer than MIN_STEPS; the model is not shrunk for it.
  small = ts.choose(4500, 7, 3, batch=128, budget_flops=ten)
  assert small["steps"] == ts.MAX_EPOCHS * 4500 // 128 < ts.MIN_STEPS
  assert small["width"] > ts.LADDER[0][0]


def test_choose_keeps_the_users_values():
  c = ts.choose(50000, 7, 4, batch=128, budget_flops=FIVE_MIN, width=48, heads=3)
  assert c["width"] == 48 and c["heads"] == 3 and c["flops"] <= FIVE_MIN * (1 + 1e-9)
  c = ts.choose(50000, 7, 4, batch=128, budget_flops=FIVE_MIN, steps=123)
  assert c["steps"] == 123
  c = ts.choose(50000, 7, 4, batch=128, budget_flops=None, width=64, depth=2, steps=10)
  assert (c["width"], c["depth"], c["steps"]) == (64, 2, 10)
  with pytest.raises(ValueError, match=r"config\.train\.steps = 0 .* needs config\.train\.budget"):
    ts.choose(50000, 7, 4, batch=128, budget_flops=None, width=64, depth=2)
  with pytest.raises(ValueError, match="raise it"):
    ts.choose(50000, 7, 4, batch=128, budget_flops=1e3)


def test_next_budget_doubles():
  assert ts.next_budget(FIVE_MIN) == "--config.train.budget=10min"
  assert ts.next_budget(None) == f"--config.train.budget={2 * ts.DEFAULT_MINUTES}min"


# ---------------------------------------------------------------------------- the noise rule
def _curve(plateau, means, rng, noise=0.01, batches=20, spread=0.3):
  """Feeds evaluations of per-batch losses: a fixed batch effect (the same masked batches every
  evaluation) plus fresh noise; returns the evaluation at which it stopped, or None."""
  effect = rng.normal(0, spread, batches)
  for i, m in enumerate(means):
    values = m + effect + rng.normal(0, noise, batches)
    plateau.update(i, float(values.mean()), batches=(values, np.ones(batches)))
    if plateau.stop:
      return i
  return None


def test_plateau_improving_curve_never_stops():
  rng = np.random.default_rng(0)
  assert _curve(mdm.Plateau(window=4, k=2.0), 2.0 - 0.02 * np.arange(60), rng) is None


def test_plateau_flat_noisy_curve_stops_and_keeps_the_best():
  rng = np.random.default_rng(1)
  p = mdm.Plateau(window=4, k=2.0)
  stopped = _curve(p, np.full(60, 1.0), rng)
  assert stopped is not None and stopped <= 12
  assert p.best == min(h[0] for h in p.history) and "standard errors" in p.reason()


def test_plateau_slow_trend_above_the_noise_continues():
  rng = np.random.default_rng(2)
  # 0.004 per evaluation, 0.016 per window: 4x the paired noise of the window's best (~0.0045);
  # the spread between batches (0.3, a standard error of ~0.07) is far larger and must not count.
  assert _curve(mdm.Plateau(window=4, k=2.0), 2.0 - 0.004 * np.arange(40), rng, noise=0.01) is None
  # The same trend with noise 10x larger is within the noise: it stops.
  assert _curve(mdm.Plateau(window=4, k=2.0), 2.0 - 0.004 * np.arange(40), np.random.default_rng(3),
                noise=0.1) is not None


def test_plateau_without_batches_uses_the_standard_error():
  p = mdm.Plateau(window=2, k=2.0)
  for i, loss in enumerate([1.0, 0.9, 0.85, 0.84]):
    p.update(i, loss, se=0.01)
  assert not p.stop  # gained 0.06 over the window, more than 0.02
  p.update(4, 0.845, se=0.01)
  p.update(5, 0.85, se=0.01)
  assert p.stop and p.best == 0.84 and p.best_step == 3


def test_standard_error_known_answer():
  values, weights = np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4)
  assert mdm.standard_error(values, weights) == pytest.approx(np.std(values, ddof=1) / 2)
  assert mdm.standard_error(np.array([5.0]), np.ones(1)) == 0.0


# ---------------------------------------------------------------------------- the stored report
def _report(tmp_path, broken):
  report = {"baselines": {"plugin": 0.6, "unigram": 0.9, "repeat_fraction": 0.9}, "val_nll_bound": 0.7,
            "structure": [{"rule": "x5 = f(other positions)", "broken": broken, "applies": 900}],
            "tolerance": 0.01, "budget_flops": FIVE_MIN}
  (tmp_path / classes.REPORT_FILE).write_text(json.dumps(report))
  return str(tmp_path)


def test_stored_report_warning(tmp_path):
  msg = classes.stored_report_warning(_report(tmp_path, 0.3))
  assert "x5 = f(other positions) in 30.0%" in msg and "--config.train.budget=10min" in msg
  assert classes.stored_report_warning(_report(tmp_path, 0.0)) is None
  assert classes.stored_report_warning(str(tmp_path / "absent")) is None
  (tmp_path / classes.REPORT_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="teacher_report.json.*not valid JSON"):
    classes.stored_report_warning(str(tmp_path))


def test_distill_warns_once_before_a_broken_teacher(tmp_path):
  config = tokens_config.get_config()
  config.teacher.checkpoint = _report(tmp_path, 0.57)
  with mock.patch.object(classes.logging, "warning") as warn:
    classes.FAMILY.prepare_distill(config, str(tmp_path / "dimo"))
  assert warn.call_count == 1 and "57.0%" in warn.call_args[0][1]
  config.teacher.checkpoint = _report(tmp_path, 0.0)
  with mock.patch.object(classes.logging, "warning") as warn:
    classes.FAMILY.prepare_distill(config, str(tmp_path / "dimo"))
  assert warn.call_count == 0


# ---------------------------------------------------------------------------- joints with global constraints
def test_global_joints_hold_their_constraints():
  j = joints.weighted_sum(3, 6, seed=1)
  s = j.support[j.probs > 0]
  assert len(s) == 3 ** 5  # every head, one last value each
  assert len(np.unique(s[:, :-1], axis=0)) == len(s)
  j = joints.count_code(4, 6, seed=2)
  s = j.support[j.probs > 0]
  assert len(np.unique(s[:, :-1], axis=0)) == len(s)
  counts = np.stack([(s[:, :-1] == v).sum(1) for v in range(4)], 1) % 4
  assert any(np.array_equal(s[:, -1], counts[:, v]) for v in range(4))
  j = joints.sorted_values(4, 6, seed=3)
  s = j.support[j.probs > 0]
  assert len(s) <= 84  # multisets of 6 over 4 values: C(9, 6)
  # Some order of the values under which every sequence is non-decreasing.
  assert any(np.all(np.diff(np.argsort(order)[s], axis=1) >= 0) for order in itertools.permutations(range(4)))
  j = joints.balanced(3, 6, seed=4)
  s = j.support[j.probs > 0]
  counts = np.stack([(s == v).sum(1) for v in range(3)], 1)
  assert (counts == counts[0]).all() and counts.min() >= 1
  for fam in (joints.weighted_sum, joints.count_code, joints.sorted_values, joints.balanced):
    assert fam(3, 6, seed=0).probs.sum() == pytest.approx(1.0)
  name, j = joints.draw_global_joint(5)
  assert name.startswith(joints.GLOBAL_FAMILIES[5 % len(joints.GLOBAL_FAMILIES)])
  assert (j.vocab_size, j.seq_len) in joints.GLOBAL_SIZES
  with pytest.raises(ValueError, match="seq_len must be >= 3"):
    joints.weighted_sum(3, 2)


# ---------------------------------------------------------------------------- one sized run
def test_tokens_config_sizes_a_teacher_to_the_data(tmp_path):
  from dimo_jax.modes import loop  # pylint: disable=import-outside-toplevel
  name, j = joints.draw_global_joint(0)
  data = tmp_path / "tokens.npy"
  np.save(data, j.sample(np.random.default_rng(0), 300))
  config = tokens_config.get_config()
  config.data.path = str(data)
  config.train.batch_size = 16
  config.train.budget = "1e9"
  config.train.eval_every = 10
  config.train.log_every = 10
  config.train.structure_samples = 100
  with mock.patch.object(classes.logging, "info") as info:
    sized = classes.FAMILY.sized_teacher_config(config)
  why = [c[0][1] for c in info.call_args_list if c[0][0].startswith("Teacher sized")]
  assert len(why) == 1 and "270 training sequences of length 6 over 3 values" in why[0]
  assert sized.model.width == 32 and sized.model.depth == 2 and sized.train.steps > 0
  assert config.model.width == 0  # the user's config is left as it was
  config.model.width = 48
  assert classes.FAMILY.sized_teacher_config(config).model.width == 48
  config.model.width = 0
  out = loop.train_teacher(config, str(tmp_path / "teacher"))
  stored = json.loads((tmp_path / "teacher" / "config.json").read_text())
  assert stored["model"]["width"] == 32 and stored["train"]["steps"] == sized.train.steps
  assert out["step"] <= sized.train.steps and "val_loss_se" in out
  report = json.loads((tmp_path / "teacher" / classes.REPORT_FILE).read_text())
  assert report["sizes"]["width"] == 32 and "far" in report


def test_teacher_benchmark_table_and_goal_line():
  bench = load_script("teacher_benchmark.py")
  row = dict(joint="weighted_sum_v3_l6_s0", tag="", vocab_size=3, seq_len=6, support=243, width=96, depth=3,
             teacher_steps=4075, steps_budget=4075, floor=0.028, teacher_best=0.137, teacher_best_row="ancestral 6",
             ratio=0.137 / 0.028, worst_broken=0.131, gap=0.029, cpu_minutes=5.8, wall_minutes=18.9, load=[11.8, 14.8])
  text = bench.table([row, dict(row, joint="sorted_v5_l6_s1", ratio=1.5, worst_broken=None, gap=None, cpu_minutes=16)])
  assert ("| weighted_sum_v3_l6_s0 | 729 (243) | 96 x 3 (4075 / 4075) | 0.0280 | 0.1370 (ancestral 6) | 4.89x | "
          "13.1% |") in text
  assert "| sorted_v5_l6_s1 |" in text and "| - | - |" in text
  assert "2 joints: median ratio 3.20x, worst 4.89x, 1/2 within 3x of the floor" in text
  assert "1/2 within 15." in text
