"""The text runs' bookkeeping: the parameter cache, the step counts, the summary and the report files."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dimo_jax.data import text_corpus
from dimo_jax.evaluation import text_eval
from dimo_jax.storage.checkpoints import UserError


def test_cache_round_trips_and_refuses_a_foreign_file(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(2)}}
  template = jax.eval_shape(lambda: params)
  calls = []
  make = lambda: (calls.append(1) or params, {"loss": 1.5})
  p1, info1 = text_eval.cached(str(tmp_path), "net", "k1", template, make, log=lambda m: None)
  p2, info2 = text_eval.cached(str(tmp_path), "net", "k1", template, make, log=lambda m: None)
  assert len(calls) == 1 and info2 == info1 == {"loss": 1.5}
  np.testing.assert_array_equal(p2["w"], params["w"])
  (tmp_path / "net-k2.msgpack").write_bytes(b"\x00garbage")
  with pytest.raises(UserError, match="net-k2.msgpack"):
    text_eval.cached(str(tmp_path), "net", "k2", template, make, log=lambda m: None)
  assert text_eval.fingerprint({"a": 1}) != text_eval.fingerprint({"a": 2})


def test_step_counts_add_the_sequence_length_and_drop_longer_ones():
  c = ml_collections.ConfigDict({"evaluate": {"teacher_steps": (1, 2, 64, 128)}})
  assert text_eval.teacher_step_counts(c, 100) == [1, 2, 64, 100]


def _row(name, model, steps, ppl, ent):
  return {"name": name, "model": model, "sampler": "ancestral", "steps": steps, "sample_seconds": 0.0,
          "gen_ppl": ppl, "entropy": ent, "distinct_1": 0.1, "distinct_2": 0.2, "distinct_3": 0.3,
          "distinct_4": 0.4, "repeat_4": 0.0}


def test_summary_and_report_files(tmp_path):
  rows = [_row("real", "data", 0, 10.0, 3.0), _row("t1", "teacher", 1, 400.0, 3.9), _row("t8", "teacher", 8, 20.0, 3.1),
          _row("g", "generator", 1, 25.0, 3.03)]
  s = text_eval.summary(rows)
  assert s["teacher_best"] == "t8" and s["ratio_to_teacher_best"] == 1.25 and s["teacher_one_step_gen_ppl"] == 400.0
  np.testing.assert_allclose(s["entropy_gap_to_real"], 0.01)
  corpus = text_corpus.TextCorpus(dataset=None, tokenizer=text_corpus.ByteTokenizer(), sep_id=256, source="x")
  tokens = np.array([[72, 105, 256, 33]] * 3)
  sets = {r["name"]: {"tokens": tokens} for r in rows}
  paths = text_eval.write_report(str(tmp_path), corpus, rows, sets, {"seed": 1})
  assert all(os.path.getsize(p) > 0 for p in paths.values())
  assert json.load(open(paths["json"]))["summary"]["teacher_best"] == "t8"
  assert "1.25x the teacher's best" in open(paths["table"]).read()
  assert "Hi<|sep|>!" in open(paths["samples"], encoding="utf-8").read()


def test_sample_sets_cache_the_teacher_rows_and_draw_the_generator(tmp_path):
  from configs import text  # pylint: disable=import-outside-toplevel
  c = text.get_config()
  c.model.update(width=16, depth=1, heads=2, mlp_dim=32)
  c.evaluate.update(num_samples=4, teacher_steps=(1, 2), teacher_samplers=("ancestral",))
  rows = np.arange(40 * 8).reshape(40, 8) % 257
  ds = text_corpus.TokenDataset(rows, None, rows, None, 257, 0, None, "t")
  corpus = text_corpus.TextCorpus(ds, text_corpus.ByteTokenizer(), 256, "t")
  model = text_eval.build_teacher(c, corpus)
  params = model.init_params(jax.random.key(0))
  logs = []
  first = text_eval.sample_sets(c, corpus, model, params, params, seed=3, workdir=str(tmp_path), log=logs.append)
  again = text_eval.sample_sets(c, corpus, model, params, None, seed=3, workdir=str(tmp_path), log=logs.append)
  assert list(first) == ["real held-out text", "teacher ancestral 1", "teacher ancestral 2", "teacher ancestral 8",
                         "Di[M]O generator 1"]
  assert any("teacher samples: read" in m for m in logs) and "Di[M]O generator 1" not in again
  for name in ("teacher ancestral 2", "teacher ancestral 8"):
    np.testing.assert_array_equal(first[name]["tokens"], again[name]["tokens"])
    assert again[name]["steps"] == first[name]["steps"] and first[name]["tokens"].shape == (4, 8)
  assert first["Di[M]O generator 1"]["tokens"].max() < 257


def _tiny_generator():
  from configs import text  # pylint: disable=import-outside-toplevel
  c = text.get_config()
  c.model.update(width=16, depth=1, heads=2, mlp_dim=32)
  c.evaluate.update(num_samples=4, teacher_steps=(1,), teacher_samplers=("ancestral",))
  rows = np.arange(40 * 8).reshape(40, 8) % 257
  corpus = text_corpus.TextCorpus(text_corpus.TokenDataset(rows, None, rows, None, 257, 0, None, "t"),
                                  text_corpus.ByteTokenizer(), 256, "t")
  model = text_eval.build_teacher(c, corpus)
  return c, corpus, model, model.init_params(jax.random.key(0))


def test_k_step_generator_is_the_one_step_draw_then_a_remasked_redraw():
  from dimo_jax.core import categorical, generator_steps as gen_steps  # pylint: disable=import-outside-toplevel
  _, _, model, params = _tiny_generator()
  key, labels = jax.random.key(7), np.zeros(5, np.int32)
  with categorical.float64_mode():
    one = categorical.one_step_sample(model, params, key, labels, r_init=0.6, sigma=0.1)
    # the compiled k-step program at one step draws what the one-step sampler draws, key for key
    k1 = text_eval._k_step(model, params, key, jnp.asarray(labels), jnp.float32(0.6), jnp.float32(0.1),  # pylint: disable=protected-access
                           jnp.float32(1.0), steps=1, schedule="linear", method="gumbel_max")
    two = text_eval.generator_sample(model, params, key, labels, steps=2, schedule="linear", r_init=0.6, sigma=0.1)
    # by hand: step 0's sample, re-masked to 0.6 / 2 (round(8 * 0.3) = 2 masks), one more forward and draw
    k_mask, k_noise, k_draw = gen_steps.step_keys(key, 1)
    x = gen_steps.remask(k_mask, one, 0.3, model.mask_id)
    assert (np.asarray(x) == model.mask_id).sum(axis=1).tolist() == [2] * 5
    logits = model.apply({"params": params}, x, jnp.asarray(labels), deterministic=True, noise_sigma=0.1,
                         rngs={"noise": k_noise})
    expected = categorical.sample(k_draw, logits[..., :model.codebook_size], 1.0, "gumbel_max")
  np.testing.assert_array_equal(k1, one)
  np.testing.assert_array_equal(two, expected)
  assert two.shape == (5, 8) and int(two.max()) < 256 + 1 and not np.array_equal(two, one)
  with pytest.raises(ValueError, match="generator_schedule"):
    text_eval.generator_sample(model, params, key, labels, steps=3, schedule=(0.3,))


def test_sample_sets_write_a_generator_row_per_step_count(tmp_path):
  c, corpus, model, params = _tiny_generator()
  one = text_eval.sample_sets(c, corpus, model, params, params, seed=3, workdir=str(tmp_path), log=lambda m: None)
  sets = text_eval.sample_sets(c, corpus, model, params, params, seed=3, workdir=str(tmp_path), log=lambda m: None,
                               generator_steps=(1, 2, 3), generator_schedule=(0.4, 0.2))
  gens = [n for n in sets if sets[n]["model"] == "generator"]
  assert gens == ["Di[M]O generator 1", "Di[M]O generator 2", "Di[M]O generator 3"]
  assert [sets[n]["steps"] for n in gens] == [1, 2, 3]
  np.testing.assert_array_equal(sets["Di[M]O generator 1"]["tokens"], one["Di[M]O generator 1"]["tokens"])


def test_summary_and_goal_per_generator_step_count():
  rows = [_row("real", "data", 0, 10.0, 3.0), _row("t8", "teacher", 8, 20.0, 3.1),
          _row("g4", "generator", 4, 23.0, 2.97), _row("g1", "generator", 1, 29.0, 3.03)]
  s = text_eval.summary(rows)
  assert [g["steps"] for g in s["generators"]] == [1, 4]
  # the generator_* keys are the row at the most steps
  assert s["generator_steps"] == 4 and s["ratio_to_teacher_best"] == pytest.approx(1.15)
  np.testing.assert_allclose(s["entropy_gap_to_real"], -0.01)
  goal = text_eval.goal_line(s)
  assert "1.5x the teacher's best at one step, 1.2x at more steps" in goal
  assert "one step met (gen. PPL 1.45x: yes; entropy +1.0%: yes)" in goal
  assert "4 steps met (gen. PPL 1.15x: yes" in goal
  rows[2] = _row("g4", "generator", 4, 25.0, 2.97)  # 1.25x: within 1.5x, not within 1.2x
  assert "4 steps not met (gen. PPL 1.25x: no" in text_eval.goal_line(text_eval.summary(rows))
  assert "Di[M]O 4 steps: gen. PPL 25.00 = 1.25x" in text_eval.markdown_table(rows, text_eval.summary(rows))
  assert text_eval.goal_line(text_eval.summary(rows[:2])) == "Goal: no generator row."


def test_generator_plan_reads_the_folder_and_refuses_steps_it_has_no_level_for():
  c = ml_collections.ConfigDict({"sample": {"generator_steps": 0}})
  stored = {"distill": {"generator_steps": 2, "generator_schedule": [0.3]}}
  plan = text_eval._generator_plan(c, stored, "/runs/g")  # pylint: disable=protected-access
  assert plan.step_counts() == (1, 2) and plan.schedule == (0.3,)
  c.sample.generator_steps = 3
  with pytest.raises(UserError, match=r"/runs/g.*at most 2"):
    text_eval._generator_plan(c, stored, "/runs/g")  # pylint: disable=protected-access
