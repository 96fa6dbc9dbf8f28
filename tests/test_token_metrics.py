"""Label-free token metrics, the any-order bound, early stopping, the teacher's structure report,
and mode=evaluate on unconditional tokens (the README's "Your own data" path without labels)."""
import os

import jax
import numpy as np
import pytest

from configs import tokens as tokens_config
from dimo_jax.data import joints
from dimo_jax.evaluation import table1, tables
from dimo_jax.evaluation import token_metrics as tm
from dimo_jax.method import mdm
from dimo_jax.modes import evaluate
from dimo_jax.networks import conditioning, maskgit
from dimo_jax.storage import checkpoints, loaders

K, L = 3, 4
MODEL_CFG = {"arch": "preln", "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "dropout": 0.0}
STORED = {"model": MODEL_CFG, "dataset": {"name": "npy:t.npy", "vocab_size": K, "seq_len": L,
                                          "num_classes": 0, "image_shape": None}}


def test_tv_known_answers():
  a = np.array([[0, 0], [1, 1]])
  b = np.array([[0, 1], [1, 0]])
  np.testing.assert_allclose(tm.position_tv(a, b, 2), [0.0, 0.0])
  assert tm.pair_tv(a, b, 2)["mean"] == pytest.approx(1.0)
  assert tm.sequence_tv(a, b, 2) == pytest.approx(1.0)
  assert tm.sequence_tv(a, a[::-1], 2) == pytest.approx(0.0)
  c = np.array([[0, 0], [0, 0], [1, 1], [0, 1]])
  assert tm.sequence_tv(c, a, 2) == pytest.approx(0.5 * (0.0 + 0.25 + 0.25))


def test_sequence_tv_equals_joint_tv():
  """Against a huge i.i.d. reference the empirical TV approaches the exact TV to the joint."""
  joint = joints.markov_mixture(3, 4, 2, seed=1)
  rng = np.random.default_rng(0)
  samples = rng.integers(0, 3, (3000, 4))
  exact = joints.tv_distance(joint, samples)
  counts = np.round(joint.probs * 200000).astype(int)
  reference = np.repeat(joint.support, counts, axis=0)
  assert tm.sequence_tv(samples, reference, 3) == pytest.approx(exact, abs=0.01)


def test_diversity_and_baselines():
  x = np.array([[0, 1]] * 3 + [[1, 0]])
  d = tm.diversity(x, 2)
  assert d["distinct"] == 2 and d["top_share"] == pytest.approx(0.75)
  assert d["seq_entropy"] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
  b = tm.entropy_baselines(x, 2)
  assert b["plugin"] == pytest.approx(d["seq_entropy"] / 2)
  assert b["unigram"] == pytest.approx(d["seq_entropy"])  # each position has the same law here
  with pytest.raises(ValueError, match="outside"):
    tm.diversity(np.array([[0, 2]]), 2)


def test_structure_found_and_checked():
  rng = np.random.default_rng(0)
  head = rng.integers(0, 3, (600, 3))
  parity = np.concatenate([head, head.sum(1, keepdims=True) % 3], 1)
  rules = tm.find_structure(parity, 3)
  assert {r["position"] for r in rules} == {0, 1, 2, 3} and all(r["kind"] == "others" for r in rules)
  assert tm.structure_summary(rules, parity) == 0.0
  broken = parity.copy()
  broken[:300, 3] = (broken[:300, 3] + 1) % 3
  assert tm.structure_summary(rules, broken) == pytest.approx(0.5)
  copy = np.concatenate([head, (head[:, :1] + 1) % 3], 1)
  pair = [r for r in tm.find_structure(copy, 3) if r["kind"] == "pair"]
  assert pair and {(r["position"], r["given"]) for r in pair} >= {(3, 0)}
  assert tm.find_structure(rng.integers(0, 3, (600, 4)), 3) == []  # independent tokens: none


def test_plateau():
  p = mdm.Plateau(patience=2, min_delta=0.01)
  assert p.update(0, 3.0) and p.update(1, 2.0)
  assert not p.update(2, 1.995) and not p.stop
  assert not p.update(3, 2.5) and p.stop and p.best_step == 1
  assert not mdm.Plateau(patience=0).stop


def _model_and_params(seed=0):
  model = loaders.model_from_stored(STORED)
  params = jax.jit(lambda k: maskgit.init_params(model, k))(jax.random.key(seed))
  return model, params


def test_nll_bound_of_a_uniform_model_is_log_k():
  """A model whose logits ignore the input gives -log(1/K) per token at every masking."""
  model, params = _model_and_params()
  apply_fn = lambda p, x, l: jax.numpy.zeros(x.shape + (K + 1,))  # noqa: E731
  tokens = np.random.default_rng(0).integers(0, K, (37, L))
  bound = mdm.nll_bound(apply_fn, params, tokens, mask_id=K, batch_size=16)
  np.testing.assert_allclose(bound, np.log(K), rtol=1e-5)
  real = mdm.nll_bound(conditioning.make_apply_fn(model), params, tokens, mask_id=K)
  assert real.shape == (37,) and np.all(np.isfinite(real)) and np.all(real > 0)


def test_teacher_report_warns_on_broken_structure():
  """An untrained model does not know the sum rule: the report says so."""
  model, params = _model_and_params()
  rng = np.random.default_rng(0)
  head = rng.integers(0, K, (400, L - 1))
  data = np.concatenate([head, head.sum(1, keepdims=True) % K], 1)
  out = tm.teacher_report(conditioning.make_apply_fn(model), params, data, data[:50], vocab_size=K, mask_id=K,
                          null_label=0, key=jax.random.key(0), num_samples=200, batch_size=100)
  assert out["rules"] == L and out["warnings"] and "break" in out["warnings"][0]
  assert out["baselines"]["unigram"] > 0 and np.isfinite(out["val_nll_bound"])


def test_ratio_uses_sequence_tv():
  results = {"rows": [
      {"name": "teacher_steps1", "model": "teacher", "steps": 1, "tv_seq": 0.8, "tv_pair_mean": 0.2},
      {"name": "teacher_steps4", "model": "teacher", "steps": 4, "tv_seq": 0.2, "tv_pair_mean": 0.05},
      {"name": "generator_temp1", "model": "generator", "steps": 1, "tv_seq": 0.3, "tv_pair_mean": 0.06,
       "distinct": 12}]}
  r = tables.ratio_to_teacher_best(results)
  assert r["metric"] == "tv_seq" and r["generators"]["generator_temp1"] == pytest.approx(1.5)
  table = tables.format_table(results)
  assert "TV-seq" in table and "| 12 |" in table
  assert "TV-seq over the teacher's best (0.2000" in tables.ratio_note(results)


def test_evaluate_unconditional_tokens(tmp_path, monkeypatch):
  """mode=evaluate on unlabelled tokens with the tokens config: the default sample count, step
  counts cut to the sequence length, the label-free columns and the ratio."""
  rng = np.random.default_rng(0)
  head = rng.integers(0, K, (300, L - 1))
  np.save(tmp_path / "t.npy", np.concatenate([head, head.sum(1, keepdims=True) % K], 1).astype(np.int32))
  _, t_params = _model_and_params(0)
  _, g_params = _model_and_params(1)
  checkpoints.save_params(str(tmp_path / "teacher"), t_params, STORED, ema_params=t_params)
  checkpoints.save_params(str(tmp_path / "distill" / "generator"), g_params, dict(STORED, role="generator"),
                          ema_params=g_params)
  c = tokens_config.get_config()
  c.mode = "evaluate"
  c.data.path = str(tmp_path / "t.npy")
  c.teacher.checkpoint = str(tmp_path / "teacher")
  c.evaluate.num_samples = 0  # the default count for unconditional data
  c.evaluate.teacher_steps = (1, 2, 8)
  c.evaluate.batch_size = 500
  c.model.update(MODEL_CFG)
  monkeypatch.setattr(table1, "DEFAULT_TOKEN_SAMPLES", 500)
  monkeypatch.setattr(table1, "NLL_SAMPLES", 64)
  results = evaluate.run_evaluate(c, str(tmp_path / "distill"))
  rows = {r["name"]: r for r in results["rows"]}
  assert results["num_samples"] == 500
  assert {"teacher_steps1", "teacher_steps2", "teacher_steps4", "generator_temp1"} <= set(rows)
  assert "teacher_steps8" not in rows
  for r in results["rows"]:
    assert 0 <= r["tv_seq"] <= 1 and 0 <= r["tv_pair_mean"] <= 1 and r["distinct"] >= 1
  assert rows["real_halves"]["structure_broken"] == 0.0
  assert results["ratio_to_teacher_best"]["metric"] == "tv_seq"
  assert results["token_data"]["rules"] and results["token_data"]["enumerable"]
  table = open(os.path.join(str(tmp_path / "distill"), "eval", "table.md")).read()
  assert "TV-pair" in table and "unigram entropy" in table


def test_distance_to_data_names_the_gap_and_the_next_budget():
  base = {"baselines": {"plugin": 0.60, "unigram": 0.95, "repeat_fraction": 0.9}, "val_nll_bound": 0.62,
          "structure": [{"rule": "x5 = f(other positions)", "broken": 0.004}]}
  near = tm.distance_to_data(base, budget_flops=7.5e12, sizes={"width": 96, "depth": 3, "steps": 4000, "trained": 2500})
  assert near["far"] is False and near["gap"] == pytest.approx(0.02) and "next_budget" not in near
  broken = dict(base, structure=[{"rule": "x5 = f(other positions)", "broken": 0.57}])
  far = tm.distance_to_data(broken, budget_flops=7.5e12, sizes={"width": 96, "depth": 3, "steps": 4000,
                                                                  "trained": 2500})
  assert far["far"] and far["next_budget"] == "--config.train.budget=10min"
  assert "57.0% of its samples break" in far["advice"] and "width 96, depth 3, 2500 of 4000 steps" in far["advice"]
  loose = tm.distance_to_data(dict(base, val_nll_bound=0.80), budget_flops=None, sizes={"steps": 3000})
  assert loose["far"] and "0.200 nats/token above" in loose["advice"]
  assert loose["next_budget"] == "--config.train.steps=6000"  # every size given: no budget to raise
  # Few repeated sequences: the plug-in entropy is too low to compare, no gap is claimed.
  rare = dict(base, val_nll_bound=0.80, baselines=dict(base["baselines"], repeat_fraction=0.1))
  assert tm.distance_to_data(rare)["gap"] is None and not tm.distance_to_data(rare)["far"]
