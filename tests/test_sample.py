import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from dimo_jax.core import samplers
from dimo_jax.modes import sample
from dimo_jax.networks import conditioning, maskgit
from dimo_jax.storage import checkpoints, loaders

K, L, C = 5, 16, 3
MODEL_CFG = {"arch": "preln", "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "dropout": 0.0}


def _teacher(workdir, arch="preln", num_classes=C, ema_shift=0.0, zeros=False):
  cfg = dict(MODEL_CFG, arch=arch)
  stored = {"model": cfg, "dataset": {"name": "npy:t.npy", "vocab_size": K, "seq_len": L,
                                      "num_classes": num_classes, "image_shape": [4, 4]}}
  model = loaders.model_from_stored(stored)
  init = lambda k: maskgit.init_params(model, k)
  if zeros:  # no compilation needed
    params = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(init, jax.random.key(0)))
  else:
    params = jax.jit(init)(jax.random.key(0))
  ema = jax.tree_util.tree_map(lambda p: p + ema_shift, params)
  checkpoints.save_params(workdir, params, stored, ema_params=ema)
  return model, params, ema


def _config(workdir, **sample_kw):
  c = digits.get_config()
  c.mode = "sample"
  c.sample.checkpoint = str(workdir)
  c.sample.num = 10
  c.sample.batch_size = 4
  c.sample.steps = 4
  for k, v in sample_kw.items():
    c.sample[k] = v
  return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("teacher")
  model, params, ema = _teacher(d, ema_shift=0.01)
  return d, model, params, ema


def test_run_sample_outputs_and_equivalence(teacher_dir, tmp_path):
  d, model, _, ema = teacher_dir
  out = tmp_path / "out" / "s.npy"
  res = sample.run_sample(_config(d, output=str(out)), str(tmp_path))
  assert res["tokens"] == str(out) and res["num"] == 10
  tokens = np.load(out)
  labels = np.load(tmp_path / "out" / "s_labels.npy")
  assert tokens.shape == (10, L) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < K  # every token filled, never the mask id
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2, 0, 1, 2, 0])  # balanced
  assert os.path.isfile(tmp_path / "out" / "s.png")
  # Batch i is the confidence sampler with fold_in(key(seed), i) on the EMA parameters.
  apply_fn = conditioning.make_apply_fn(model)
  ref = samplers.confidence_sampler(apply_fn, ema, jax.random.fold_in(jax.random.key(0), 1),
                                    jnp.asarray([1, 2, 0, 1]), seq_len=L, codebook_size=K, steps=4,
                                    schedule="arccos", r_temp=4.5)
  np.testing.assert_array_equal(tokens[4:8], np.asarray(ref))
  # The last batch is padded: its two rows equal the first rows of the padded batch.
  ref_last = samplers.confidence_sampler(apply_fn, ema, jax.random.fold_in(jax.random.key(0), 2),
                                         jnp.asarray([2, 0, 2, 0]), seq_len=L, codebook_size=K, steps=4,
                                         schedule="arccos", r_temp=4.5)
  np.testing.assert_array_equal(tokens[8:], np.asarray(ref_last)[:2])
  # Same seed: same samples; another seed: different samples.
  again = sample.run_sample(_config(d, output=str(tmp_path / "again.npy")), str(tmp_path))
  np.testing.assert_array_equal(np.load(again["tokens"]), tokens)
  other = sample.run_sample(_config(d, output=str(tmp_path / "other.npy"), seed=1), str(tmp_path))
  assert not np.array_equal(np.load(other["tokens"]), tokens)


def test_labels_and_default_output(teacher_dir, tmp_path):
  d, *_ = teacher_dir
  res = sample.run_sample(_config(d, labels="2, 2,0", sampler="ancestral", num=5, batch_size=5), str(tmp_path))
  assert res["tokens"] == os.path.join(str(tmp_path), "samples.npy")
  np.testing.assert_array_equal(np.load(tmp_path / "samples_labels.npy"), [2, 2, 0, 2, 2])
  assert np.load(tmp_path / "samples.npy").shape == (5, L)


def test_parse_labels():
  np.testing.assert_array_equal(sample.parse_labels("", 5, 2), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(sample.parse_labels("7", 3, 10), [7, 7, 7])
  np.testing.assert_array_equal(sample.parse_labels("", 3, 0), [0, 0, 0])
  with pytest.raises(ValueError, match=r"sample.labels.*'x' is not an integer"):
    sample.parse_labels("3,x", 4, 10)
  with pytest.raises(ValueError, match=r"class 10 is outside \[0, 10\)"):
    sample.parse_labels("3,10", 4, 10)
  with pytest.raises(ValueError, match="unconditional"):
    sample.parse_labels("1", 4, 0)


def test_bad_settings(teacher_dir, tmp_path):
  d, *_ = teacher_dir
  with pytest.raises(ValueError, match="sample.sampler"):
    sample.run_sample(_config(d, sampler="greedy"), str(tmp_path))
  with pytest.raises(ValueError, match=r"sample.steps=99"):
    sample.run_sample(_config(d, steps=99), str(tmp_path))
  with pytest.raises(ValueError, match="sample.labels"):
    sample.run_sample(_config(d, labels="5"), str(tmp_path))
  with pytest.raises(ValueError, match=r"\.npy"):
    sample.run_sample(_config(d, output=str(tmp_path / "x.txt")), str(tmp_path))
  with pytest.raises(ValueError, match="sample.model"):
    sample.run_sample(_config(d, model="student"), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="mode=teacher"):
    sample.run_sample(_config(tmp_path / "missing"), str(tmp_path))


def test_guidance_needs_null_class(tmp_path):
  _teacher(tmp_path / "bert", arch="bert", zeros=True)
  with pytest.raises(ValueError, match="guidance"):
    sample.run_sample(_config(tmp_path / "bert", guidance=2.0), str(tmp_path))
  _teacher(tmp_path / "uncond", num_classes=0, zeros=True)
  with pytest.raises(ValueError, match="unconditional"):
    sample.run_sample(_config(tmp_path / "uncond", guidance=2.0), str(tmp_path))


def test_load_teacher_raw_params_and_missing_config(teacher_dir, tmp_path):
  d, model, params, ema = teacher_dir
  m, p, stored = loaders.load_teacher(d, use_ema=False)
  assert m == model and stored["dataset"]["vocab_size"] == K
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(p)[0], jax.tree_util.tree_leaves(params)[0])
  _, p_ema, _ = loaders.load_teacher(d)
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(p_ema)[0], jax.tree_util.tree_leaves(ema)[0])
  checkpoints.save_params(tmp_path / "noconfig", params)
  with pytest.raises(FileNotFoundError, match="config.json"):
    loaders.load_teacher(tmp_path / "noconfig")
