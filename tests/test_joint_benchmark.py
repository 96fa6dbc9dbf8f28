"""The benchmark's joint families (exact probabilities) and the benchmark itself at a tiny size
(one small joint, a tiny model, a few steps) through the command line."""
import json
import os

import numpy as np
import pytest

from conftest import load_script


def load_path(path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("dimo_variant_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
from dimo_jax.data import joints


@pytest.mark.parametrize("family", joints.FAMILIES)
def test_families_are_distributions(family):
  name, joint = joints.draw_joint(3, family)
  assert name.startswith(family)
  assert joint.probs.shape == (joint.vocab_size ** joint.seq_len,)
  assert np.all(joint.probs >= 0) and joint.probs.sum() == pytest.approx(1.0)
  again = joints.draw_joint(3, family)[1]
  np.testing.assert_array_equal(joint.probs, again.probs)  # a seed is one joint


def test_constraints_hold_on_the_support():
  j = joints.sum_rule(3, 5, seed=1)
  s = j.support[j.probs > 0]
  assert np.all(s[:, -1] == s[:, :-1].sum(1) % 3)
  c = joints.copy_permutation(4, 6, seed=2)
  s = c.support[c.probs > 0]
  assert len(s) <= 4 ** 3  # the last three positions are functions of the first three
  assert len(np.unique(s[:, :3], axis=0)) == len(s)


def test_hidden_markov_matches_brute_force():
  j = joints.hidden_markov(2, 3, 2, seed=0)
  rng = np.random.default_rng(0)
  init = rng.dirichlet(np.full(2, 0.3))
  trans = rng.dirichlet(np.full(2, 0.3), size=2)
  emit = rng.dirichlet(np.full(2, 0.3), size=2)
  probs = []
  for x in j.support:
    p = 0.0
    for h in np.ndindex(2, 2, 2):
      q = init[h[0]] * emit[h[0], x[0]]
      for i in (1, 2):
        q *= trans[h[i - 1], h[i]] * emit[h[i], x[i]]
      p += q
    probs.append(p)
  np.testing.assert_allclose(j.probs, np.array(probs) / sum(probs), rtol=1e-10)


def test_markov_order_two_depends_on_two_back():
  j = joints.markov_order_mixture(2, 4, num_chains=1, order=2, seed=0)
  p = j.probs.reshape(2, 2, 2, 2)
  cond = p / p.sum(-1, keepdims=True)  # p(x3 | x0, x1, x2)
  np.testing.assert_allclose(cond[0], cond[1], rtol=1e-9)  # x0 does not matter at order 2
  assert not np.allclose(cond[:, 0], cond[:, 1])  # x1 does


def test_benchmark_tiny(tmp_path):
  """One 3-value, 3-position joint; teacher and distillation through the command line."""
  bench = load_script("joint_benchmark.py")
  tiny_model = "--config.model.width=16 --config.model.depth=1 --config.model.heads=2 --config.model.mlp_dim=32"
  results = bench.main([
      f"--out={tmp_path}", "--seeds=1", "--family=sum_rule", "--vocab_size=3", "--seq_len=3",
      "--train_size=300", "--num_samples=500",
      f"--teacher_args=--config.train.steps=40 --config.train.eval_every=20 --config.train.warmup_steps=5 "
      f"--config.train.structure_samples=100 {tiny_model}",
      "--distill_args=--config.distill.steps=4 --config.distill.warmup_steps=1 --config.distill.batch_size=16",
      '--variants=[{"name":"k2","generator_steps":2,"generator_schedule":"cosine","gen_lr":2e-3}]'])
  assert len(results) == 1
  r = results[0]
  assert r["variant"] == "k2" and r["generator_steps"] == 2 and sorted(r["by_steps"]) == ["1", "2", "4"]
  assert r["by_steps"]["1"]["tv"] == r["generator"]
  for at in r["by_steps"].values():
    assert 0 <= at["tv"] <= 1 and at["ratio"] == pytest.approx(at["tv"] / r["teacher_best"])
  stored = json.load(open(os.path.join(str(tmp_path), r["joint"], "distill_k2", "generator", "config.json")))
  assert stored["distill"]["generator_steps"] == 2 and stored["distill"]["generator_schedule"] == "cosine"
  assert stored["distill"]["gen_lr"] == 2e-3  # a key configs/tokens.py carries passes as a flag
  assert r["joint"] == "sum_rule_v3_l3_s1" and r["nan_count"] == 0 and r["finite"]
  for k in ("floor", "teacher_best", "teacher_one_confidence", "generator"):
    assert 0 <= r[k] <= 1
  assert r["ratio"] == pytest.approx(r["generator"] / r["teacher_best"])
  teacher = json.load(open(os.path.join(str(tmp_path), r["joint"], "teacher_rows.json")))
  for wall, cpu in ((r["distill_seconds"], r["distill_cpu_seconds"]), (teacher["seconds"], teacher["cpu_seconds"])):
    assert 0 < cpu <= wall * os.cpu_count() + 1  # the child's own user + system time, at most every core busy
  table = open(os.path.join(str(tmp_path), "table.md")).read()
  assert "sum_rule_v3_l3_s1" in table and "within 1.5x" in table and "k2, 2 steps: 1 joints" in table
  with open(os.path.join(str(tmp_path), "results.jsonl")) as f:
    assert json.loads(f.readline())["joint"] == r["joint"]


def test_variant_keys_the_config_lacks_go_through_a_config_file(tmp_path):
  bench = load_script("joint_benchmark.py")
  flags, new = bench._split_variant({"name": "v", "gen_lr": 3e-4, "generator_steps": 4, "a_new_knob": [0.4, 0.2, 0.1]})
  assert flags == ["--config.distill.gen_lr=0.0003", "--config.distill.generator_steps=4"]
  assert new == {"a_new_knob": [0.4, 0.2, 0.1]}
  path = bench._variant_config(str(tmp_path / "config_v.py"), new)
  module = load_path(path)
  cfg = module.get_config()
  assert tuple(cfg.distill.a_new_knob) == (0.4, 0.2, 0.1) and cfg.distill.generator_steps == 1
  assert cfg.distill.steps == 1000 and cfg.data.name == "npy"  # everything else: configs/tokens.py
  with pytest.raises(ValueError, match="variant key 'a.b'"):
    bench._variant_config(str(tmp_path / "bad.py"), {"a.b": 1})
  with pytest.raises(ValueError, match="variant key 'steps'"):
    bench._variant_config(str(tmp_path / "bad.py"), {"steps": {"nested": 1}})


def test_teacher_log_counts_the_structure_warnings(tmp_path):
  bench = load_script("joint_benchmark.py")
  warn = ("08:51:43 WARNING: the teacher's samples break structure the data always holds: x{} = f(other positions) "
          "holds in all 4500 training sequences, and 40.1% of 1923 samples (ancestral, 5 steps) break it\n")
  log = tmp_path / "teacher.log"
  log.write_text(warn.format(0) + warn.format(3) + "08:51:44 Teacher training finished at step 3500 after 218.0s: {}\n")
  assert bench._teacher_log(str(log)) == {"teacher_steps": 3500, "structure_warnings": 2}
  log.write_text("Teacher training finished at step 4000 after 1.0s\n")
  assert bench._teacher_log(str(log)) == {"teacher_steps": 4000, "structure_warnings": 0}


def test_table_lists_each_step_count_and_older_rows():
  bench = load_script("joint_benchmark.py")
  base = dict(joint="j", vocab_size=3, seq_len=2, support=9, floor=0.01, data_floor=0.02, teacher_one_confidence=0.5,
              teacher_one_ancestral=0.5, teacher_best=0.1, teacher_best_row="ancestral 2", generator_top_share=0.2,
              truth_top_share=0.2, nan_count=0)
  new = dict(base, variant="k2", generator=0.2, ratio=2.0,
             by_steps={"1": {"tv": 0.2, "ratio": 2.0}, "2": {"tv": 0.105, "ratio": 1.05}, "4": {"tv": 0.3, "ratio": 3.0}})
  old = dict(base, variant="defaults", generator=0.12, ratio=1.2)
  text = bench.table([new, old])
  assert "| 0.2000 | 2.00x | 0.1050 (1.05x) | 0.3000 (3.00x) |" in text
  assert "| 0.1200 | 1.20x | - | - |" in text
  assert "- k2, 2 steps: 1 joints, median ratio 1.05x, worst 1.05x, mean 1.05x, 1/1 within 1.1x" in text
  assert "- defaults, 1 step: 1 joints, median ratio 1.20x" in text and "defaults, 2 steps" not in text
