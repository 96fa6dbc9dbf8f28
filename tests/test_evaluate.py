import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits
from dimo_jax.evaluation import features, metrics, settings, tables
from dimo_jax.modes import evaluate, sample
from dimo_jax.networks import conditioning, maskgit
from dimo_jax.storage import checkpoints, loaders

K, L, C = 5, 16, 3
MODEL_CFG = {"arch": "preln", "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "dropout": 0.0}
STORED = {"model": MODEL_CFG, "dataset": {"name": "npy:t.npy", "vocab_size": K, "seq_len": L,
                                          "num_classes": C, "image_shape": [4, 4]}}


def _synthetic_data(folder, n=240, seed=0):
  """4x4 grey images, 5 levels, 3 classes: class c lights row c (and row 3 for noise)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % C
  img = rng.integers(0, 2, size=(n, 4, 4))
  for i, c in enumerate(labels):
    img[i, c, :] = rng.integers(3, 5, size=4)
  tokens = img.reshape(n, L).astype(np.int32)
  np.save(os.path.join(folder, "t.npy"), tokens)
  np.save(os.path.join(folder, "l.npy"), labels.astype(np.int32))
  return tokens, labels


def _save_model(folder, seed, shift=0.0):
  model = loaders.model_from_stored(STORED)
  params = jax.jit(lambda k: maskgit.init_params(model, k))(jax.random.key(seed))
  ema = jax.tree_util.tree_map(lambda p: p + shift, params)
  checkpoints.save_params(folder, params, STORED, ema_params=ema)
  return model, ema


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  tokens, labels = _synthetic_data(str(root))
  teacher_dir = root / "teacher"
  workdir = root / "distill"
  t_model, t_params = _save_model(str(teacher_dir), 0, shift=0.01)
  _, g_params = _save_model(str(workdir / "generator"), 1)
  return dict(root=root, teacher=str(teacher_dir), workdir=str(workdir), tokens=tokens, labels=labels,
              t_model=t_model, t_params=t_params, g_params=g_params)


def _config(setup, **ev):
  c = digits.get_config()
  c.mode = "evaluate"
  c.data.name = "npy"
  c.data.path = str(setup["root"] / "t.npy")
  c.data.labels = str(setup["root"] / "l.npy")
  c.data.vocab_size = K
  c.data.num_classes = C
  c.data.image_shape = (4, 4)
  c.data.val_fraction = 0.25
  c.teacher.checkpoint = setup["teacher"]
  c.sample.batch_size = 8
  c.sample.seed = 5
  settings = dict(teacher_steps=(1, 2), generator_temperatures=(1.0,), per_class=10, entropy_samples=12,
                  timing_repeats=1, grid_steps=(1, 2), classifier=dict(steps=150, feature_dim=32))
  settings.update(ev)
  c.evaluate = ml_collections.ConfigDict(settings)
  return c


@pytest.fixture(scope="module")
def first_run(setup):
  return evaluate.run_evaluate(_config(setup), setup["workdir"])


def _row(results, name):
  return next(r for r in results["rows"] if r["name"] == name)


def test_outputs_fields_and_table(setup, first_run):
  res = first_run
  names = [r["name"] for r in res["rows"]]
  assert names == ["teacher_steps1", "teacher_steps2", "generator_temp1", "real_train", "real_halves"]
  assert res["num_samples"] == 30 and res["reference"]["num"] == 60  # 25 % of 240 held out
  for name in names[:3]:
    row = _row(res, name)
    assert row["num_samples"] == 30
    for key in ("fd_pixel", "fd_classifier", "accuracy", "precision", "recall", "density", "coverage"):
      assert np.isfinite(row[key]), (name, key)
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["coverage"] <= 1.0
    assert row["ms_per_sample"] > 0 and row["prdc_features"] == "classifier"
  assert _row(res, "teacher_steps2")["steps"] == 2 and _row(res, "generator_temp1")["steps"] == 1
  assert res["generation"]["teacher_steps1"] == {"generated": 4, "loaded": 0}  # 30 samples, batch 8
  assert res["classifier"]["val_accuracy"] > 0.9
  assert res["floor_two_halves"]["fd_pixel"] == _row(res, "real_halves")["fd_pixel"]

  out = os.path.join(setup["workdir"], "eval")
  for f in ("results.json", "table.md", "grid.png", "entropy.png"):
    assert os.path.isfile(os.path.join(out, f)), f
  with open(os.path.join(out, "results.json")) as f:
    stored = json.load(f)
  assert [r["name"] for r in stored["rows"]] == names
  assert stored["rows"][0]["fd_pixel"] == pytest.approx(res["rows"][0]["fd_pixel"])

  table = tables.format_table(res)
  lines = table.splitlines()
  assert lines[0] == ("| Model | steps | FD-pixel | FD-classifier | Acc | Prec | Rec | Dens | Cov | ms/sample |")
  assert lines[2].startswith("| Teacher | 1 | ") and lines[3].startswith("| Teacher | 2 | ")
  assert lines[4].startswith("| Di[M]O | 1 | ")
  assert lines[5].startswith("| Real data (train split) | - | ")
  with open(os.path.join(out, "table.md")) as f:
    md = f.read()
  assert table in md and "## Entropy shift" in md

  from PIL import Image
  grid = Image.open(os.path.join(out, "grid.png"))
  assert grid.size == (10 * 4 * 4, 3 * 4 * 4)  # 10 columns x (teacher 1, 2 steps, generator), 4x4 px x4


def test_metric_sanity(first_run):
  res = first_run
  # Random-weight models draw near-random tokens: far from the data; real data is close.
  floor = _row(res, "real_halves")["fd_pixel"]
  real = _row(res, "real_train")
  for name in ("teacher_steps1", "teacher_steps2", "generator_temp1"):
    assert _row(res, name)["fd_pixel"] > 3 * max(floor, real["fd_pixel"])
    assert _row(res, name)["fd_classifier"] > real["fd_classifier"]
  assert real["accuracy"] > 0.9


def test_score_real_vs_random():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(200, 4)) * [1.0, 2.0, 0.5, 1.0]
  ref = features.Reference("r", features.Features(pixel=real[:100]), num=100)
  s = settings.EvalSettings()
  same = features.score(features.Features(pixel=real[100:]), None, ref, s)
  rand = features.score(features.Features(pixel=rng.uniform(-6, 6, size=(100, 4))), None, ref, s)
  assert same["fd_pixel"] < 0.1 * rand["fd_pixel"]
  assert same["precision"] > rand["precision"] and same["density"] > rand["density"]
  assert same["fd_pixel"] == pytest.approx(metrics.fid_from_features(real[100:], real[:100]))


def test_resume_does_not_regenerate(setup, first_run):
  out = os.path.join(setup["workdir"], "eval", "samples")
  chunks = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs if f.startswith("chunk_"))
  assert len(chunks) == 12  # 3 sets x 4 chunks
  mtimes = {p: os.stat(p).st_mtime_ns for p in chunks}
  res = evaluate.run_evaluate(_config(setup), setup["workdir"])
  assert all(c == {"generated": 0, "loaded": 4} for c in res["generation"].values())
  assert {p: os.stat(p).st_mtime_ns for p in chunks} == mtimes
  for a, b in zip(first_run["rows"], res["rows"]):
    assert a["fd_pixel"] == pytest.approx(b["fd_pixel"]) and a["accuracy"] == b["accuracy"]

  # An interrupted run: one chunk missing -> only it is drawn again, with the same tokens.
  victim = os.path.join(out, "teacher_steps2", "chunk_00001.npz")
  with np.load(victim) as z:
    before = z["tokens"].copy()
  os.remove(victim)
  res = evaluate.run_evaluate(_config(setup, entropy_samples=0, timing_repeats=0), setup["workdir"])
  assert res["generation"]["teacher_steps2"] == {"generated": 1, "loaded": 3}
  assert res["generation"]["teacher_steps1"] == {"generated": 0, "loaded": 4}
  with np.load(victim) as z:
    np.testing.assert_array_equal(z["tokens"], before)
  assert _row(res, "teacher_steps2")["ms_per_sample"] is None


def test_teacher_chunks_equal_sample_mode(setup, first_run):
  """Evaluation samples are the `sample` mode's samples for the same seed and batch size."""
  folder = os.path.join(setup["workdir"], "eval", "samples", "teacher_steps2")
  tokens = np.concatenate([np.load(os.path.join(folder, f"chunk_{i:05d}.npz"))["tokens"] for i in range(4)])
  cfg = _config(setup).sample
  cfg.steps = 2
  labels = conditioning.balanced_labels(30, C)
  expected = sample.sample_teacher(setup["t_model"], setup["t_params"], labels, cfg)
  np.testing.assert_array_equal(tokens, expected)


def test_entropy_histogram_known_answer(setup, first_run):
  ent = first_run["entropy_shift"]
  assert ent["threshold"] == 1e-3
  model, params = setup["t_model"], setup["t_params"]
  labels = jnp.asarray(conditioning.balanced_labels(12, C))
  logits = jax.jit(lambda p, t, y: model.apply({"params": p}, t, y, deterministic=True))(
      params, jnp.full((12, L), K, jnp.int32), labels)
  probs = np.asarray(jax.nn.softmax(logits[..., :K], -1))
  expected = metrics.entropy_shift_histogram(probs, 1e-3)
  assert ent["teacher"]["histogram"] == expected.tolist()
  assert sum(ent["generator"]["histogram"]) == 12 * L
  assert len(ent["generator"]["histogram"]) == K + 1


def test_format_table_known_answer():
  res = {"rows": [
      {"label": "Teacher", "steps": 16, "fid": 6.6012, "inception_score": 224.07, "precision": 0.831,
       "recall": 0.402, "density": 1.2461, "coverage": 0.977, "ms_per_sample": 1.5},
      {"label": "Di[M]O", "steps": 1, "fid": 6.91, "inception_score": 214.0, "precision": 0.828,
       "recall": 0.377, "density": 1.255, "coverage": 0.967, "ms_per_sample": None},
  ]}
  assert tables.format_table(res) == (
      "| Model | steps | FID | IS | Prec | Rec | Dens | Cov | ms/sample |\n"
      "|---|---|---|---|---|---|---|---|---|\n"
      "| Teacher | 16 | 6.60 | 224.07 | 0.831 | 0.402 | 1.246 | 0.977 | 1.500 |\n"
      "| Di[M]O | 1 | 6.91 | 214.00 | 0.828 | 0.377 | 1.255 | 0.967 | - |")


def test_ratio_to_teacher_best_known_answer():
  res = {"rows": [
      {"name": "teacher_steps1", "model": "teacher", "label": "Teacher (confidence)", "steps": 1, "fd_pixel": 200.0},
      {"name": "teacher_ancestral_steps16", "model": "teacher", "label": "Teacher (ancestral)", "steps": 16,
       "fd_pixel": 150.0},
      {"name": "generator_temp1", "model": "generator", "label": "Di[M]O", "steps": 1, "fd_pixel": 180.0},
      {"name": "real_halves", "model": "real", "steps": None, "fd_pixel": 10.0},
  ]}
  ratio = tables.ratio_to_teacher_best(res)
  assert ratio["metric"] == "fd_pixel" and ratio["teacher_best"] == 150.0
  assert ratio["teacher_best_row"] == "teacher_ancestral_steps16"
  assert ratio["generators"] == {"generator_temp1": pytest.approx(1.2)}
  assert tables.ratio_note(res) == ("Di[M]O FD-pixel over the teacher's best (150.00: Teacher (ancestral), "
                                      "16 steps): 1.20x.")
  assert tables.ratio_to_teacher_best({"rows": res["rows"][:2]}) is None  # no generator row
  assert tables.ratio_note({"rows": []}) == ""
  # A 2-step generator's rows: a ratio per step count, each named.
  res["rows"].insert(3, {"name": "generator_steps2_temp1", "model": "generator", "label": "Di[M]O", "steps": 2,
                         "fd_pixel": 165.0})
  assert tables.ratio_to_teacher_best(res)["generator_steps"] == {"generator_temp1": 1, "generator_steps2_temp1": 2}
  assert tables.ratio_note(res).endswith("16 steps): 1.20x (1 step), 1.10x (2 steps).")


def test_several_teacher_samplers_give_rows_for_each(setup, first_run, tmp_path):
  cfg = _config(setup, teacher_steps=(2,), teacher_samplers="ancestral, confidence", entropy_samples=0,
                grid_steps=(2,), output_dir=str(tmp_path),
                classifier_dir=os.path.join(setup["workdir"], "eval", "classifier"))
  res = evaluate.run_evaluate(cfg, setup["workdir"])
  teachers = [r for r in res["rows"] if r["model"] == "teacher"]
  assert [(r["name"], r["sampler"], r["label"]) for r in teachers] == [
      ("teacher_steps2", "ancestral", "Teacher (ancestral)"),
      ("teacher_confidence_steps2", "confidence", "Teacher (confidence)")]
  # The confidence rows are those of a run with only the confidence sampler (same samples).
  assert teachers[1]["fd_pixel"] == pytest.approx(_row(first_run, "teacher_steps2")["fd_pixel"])
  best = min(teachers, key=lambda r: r["fd_pixel"])
  ratio = res["ratio_to_teacher_best"]
  assert ratio["teacher_best_row"] == best["name"]
  assert ratio["generators"]["generator_temp1"] == pytest.approx(
      _row(res, "generator_temp1")["fd_pixel"] / best["fd_pixel"])
  with open(os.path.join(str(tmp_path), "table.md")) as f:
    assert tables.ratio_note(res) in f.read()


def test_bad_settings_fail(setup, tmp_path):
  with pytest.raises(ValueError, match="unknown field"):
    settings.settings_from_config(_config(setup, bogus=1))
  with pytest.raises(ValueError, match="teacher_samplers"):
    settings.settings_from_config(_config(setup, teacher_samplers=("beam",)))
  with pytest.raises(ValueError, match="at most once"):
    settings.settings_from_config(_config(setup, teacher_samplers="ancestral,ancestral"))
  with pytest.raises(ValueError, match="reference_split"):
    settings.settings_from_config(_config(setup, reference_split="test"))
  with pytest.raises(ValueError, match="r_init"):
    settings.settings_from_config(_config(setup, r_init="half"))
  with pytest.raises(ValueError, match=r"\[1, 16\]"):
    evaluate.run_evaluate(_config(setup, teacher_steps=(32,), generator_temperatures=(), entropy_samples=0),
                          str(tmp_path))
  with pytest.raises(ValueError, match="inception_path"):
    cfg = _config(setup, teacher_steps=(1,), entropy_samples=0)
    cfg.vqgan = ml_collections.ConfigDict({"checkpoint": "/nonexistent/vqgan"})
    evaluate.run_evaluate(cfg, str(tmp_path))


def test_settings_defaults_from_sample_config(setup):
  c = _config(setup)
  c.evaluate = ml_collections.ConfigDict()
  c.sample.r_init = 0.5
  s = settings.settings_from_config(c)
  assert s.teacher_steps == (1, 2, 4, 8, 16) and s.per_class == 50 and s.prdc_k == 3
  assert s.r_init == 0.5 and s.batch_size == 8 and s.seed == 5
  s = settings.settings_from_config(_config(setup, teacher_steps="1,4", generator_temperatures=[1, 7]))
  assert s.teacher_steps == (1, 4) and s.generator_temperatures == (1.0, 7.0)


class _FakeVQGAN:
  """Decodes 16 tokens to a 4x4 RGB image (grey value token / (K - 1))."""

  def apply(self, variables, tokens, method=None):
    assert method == "decode_tokens"
    grey = tokens.reshape(tokens.shape[0], 4, 4).astype(jnp.float32) / (K - 1) * variables["scale"]
    return jnp.repeat(grey[..., None], 3, axis=-1)


def _fake_inception(calls):
  w = np.random.default_rng(0).normal(size=(48, 6)).astype(np.float32)

  def apply_fn(variables, images):
    calls.append(images.shape[0])
    pool = jnp.tanh(images.reshape(images.shape[0], -1) @ variables["w"])
    return pool, pool @ variables["w"][:6, :4] * 3.0
  return apply_fn, {"w": jnp.asarray(w)}


def test_image_mode_fid_is_prdc(setup, tmp_path, monkeypatch):
  """The VQGAN + Inception path, with tiny stand-ins for both networks."""
  from dimo_jax.converters import pytorch_fid
  from dimo_jax.storage import loaders
  calls = []
  monkeypatch.setattr(loaders, "load_vqgan", lambda path: (_FakeVQGAN(), {"scale": jnp.float32(1.0)}))
  monkeypatch.setattr(pytorch_fid, "load_fid_inception", lambda path: _fake_inception(calls))

  def cfg(**ev):
    c = _config(setup, teacher_steps=(1,), inception_path="fake.pth", is_splits=3, entropy_samples=0,
                timing_repeats=0, grid_steps=(1,), **ev)
    c.vqgan = ml_collections.ConfigDict({"checkpoint": "fake_vqgan"})
    return c

  work = str(tmp_path / "w")
  res = evaluate.run_evaluate(cfg(generator=setup["workdir"]), work)
  row = _row(res, "teacher_steps1")
  for key in ("fid", "inception_score", "precision", "recall", "density", "coverage"):
    assert np.isfinite(row[key]), key
  assert "fd_pixel" not in row and "accuracy" not in row and row["prdc_features"] == "inception"
  assert _row(res, "real_halves")["fid"] < row["fid"]
  header = tables.format_table(res).splitlines()[0]
  assert header == "| Model | steps | FID | IS | Prec | Rec | Dens | Cov |"
  assert os.path.isfile(os.path.join(work, "eval", "grid.png"))

  # The FID equals the Frechet distance of the cached Inception features.
  z = np.load(os.path.join(work, "eval", "samples", "teacher_steps1", "inception.npz"))
  ref = np.load(os.path.join(work, "eval", "reference_val_inception.npz"))
  assert row["fid"] == pytest.approx(metrics.fid_from_features(z["pool"], ref["pool"]), rel=1e-9)
  assert row["inception_score"] == pytest.approx(metrics.inception_score(z["logits"], splits=3)[0])

  # A rerun reads samples and features from disk: the Inception network is not called again.
  n_calls = len(calls)
  evaluate.run_evaluate(cfg(generator=setup["workdir"]), work)
  assert len(calls) == n_calls

  # Reference statistics (.npz mu / sigma) and reference images (.npz uint8).
  mu, sigma = np.zeros(6), np.eye(6)
  np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
  res = evaluate.run_evaluate(cfg(reference_stats=str(tmp_path / "stats.npz"), real_rows=False), work)
  mu_s, sigma_s = metrics.feature_stats(z["pool"])
  assert _row(res, "teacher_steps1")["fid"] == pytest.approx(metrics.frechet_distance(mu_s, sigma_s, mu, sigma))
  assert "precision" not in _row(res, "teacher_steps1")  # no reference features for PRDC
  images = np.random.default_rng(1).integers(0, 256, size=(20, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "ref_images.npz", arr_0=images)
  res = evaluate.run_evaluate(cfg(reference_images=str(tmp_path / "ref_images.npz"), reference_image_size=4,
                                  real_rows=False), work)
  assert res["reference"]["num"] == 20 and _row(res, "teacher_steps1")["prdc_features"] == "inception"
  with pytest.raises(ValueError, match="arr_0"):
    np.savez(tmp_path / "bad.npz", pictures=images)
    evaluate.run_evaluate(cfg(reference_images=str(tmp_path / "bad.npz"), real_rows=False), str(tmp_path / "w2"))
