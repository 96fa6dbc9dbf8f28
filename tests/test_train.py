import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from dimo_jax.core import optim
from dimo_jax.method import mdm
from dimo_jax.modes import distill, teacher
from dimo_jax.networks import conditioning
from dimo_jax.storage import checkpoints


def tiny_config(steps=60):
  c = digits.get_config()
  c.mode = "teacher"
  c.model.width = 32
  c.model.depth = 1
  c.model.heads = 2
  c.model.mlp_dim = 64
  c.model.dropout = 0.1  # dropout randomness must also be reproduced on resume
  c.train.steps = steps
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 5
  c.train.checkpoint_every = 20
  c.train.keep_checkpoints = 2
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.sample_every = 0
  c.train.eval_batch_size = 200
  c.sample.steps = 4
  return c


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


STEPS = 100


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted teacher run on digits (shared: the compiled step is reused)."""
  workdir = tmp_path_factory.mktemp("full")
  cfg = tiny_config(STEPS)
  cfg.train.eval_every = 1000  # > 0: the untrained model is evaluated too
  cfg.train.sample_every = STEPS
  out = teacher.train_teacher(cfg, str(workdir))
  return cfg, workdir, out


def test_teacher_on_digits_lowers_val_loss(full_run):
  _, workdir, out = full_run
  assert out["step"] == STEPS
  assert out["val_loss_initial"] > 2.5  # about log(18) for a fresh model
  assert out["val_loss"] < out["val_loss_initial"] - 0.8, out
  assert out["val_acc"] > 0.3
  assert os.path.isfile(workdir / "samples" / f"step_{STEPS:07d}.png")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_resume_after_kill_equals_uninterrupted(full_run, tmp_path):
  cfg, full_dir, full = full_run
  cfg = tiny_config(STEPS)  # same run settings (no sampling / initial evaluation needed)
  # Killed at step 90: the latest checkpoint is step 80, so steps 81..90 are done twice.
  part = teacher.train_teacher(cfg, str(tmp_path / "resumed"), stop_after=90)
  assert part["step"] == 90 and "val_loss" not in part
  ckpt_dir = checkpoints.checkpoint_dir(tmp_path / "resumed")
  assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [60, 80]
  resumed = teacher.train_teacher(cfg, str(tmp_path / "resumed"))
  assert resumed["step"] == STEPS
  p_full, e_full, _ = checkpoints.load_params(full_dir)
  p_res, e_res, cfg_res = checkpoints.load_params(tmp_path / "resumed")
  assert _leaves_equal(p_full, p_res)
  assert _leaves_equal(e_full, e_res)
  assert resumed["val_loss"] == full["val_loss"]
  # Training moves the parameters: the step-80 checkpoint differs (the comparison above can fail).
  p_80, _, _ = checkpoints.load_params(full_dir, step=80)
  assert not _leaves_equal(p_full, p_80)
  # The stored config carries the data sizes for sampling.
  assert cfg_res["dataset"] == {"name": "digits", "vocab_size": 17, "seq_len": 64, "num_classes": 10,
                                "image_shape": [8, 8]}
  assert cfg_res["model"]["width"] == 32
  # Running a finished workdir again does no step and reports the same validation loss.
  again = teacher.train_teacher(cfg, str(tmp_path / "resumed"))
  assert again["step"] == STEPS and again["val_loss"] == full["val_loss"]


def test_lr_schedule_known_values():
  s = optim.make_lr_schedule(1.0, steps=10, warmup_steps=4, kind="cosine")
  np.testing.assert_allclose([float(s(i)) for i in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(float(s(4)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(7)), 0.5, rtol=1e-6)  # halfway through the cosine
  np.testing.assert_allclose(float(s(10)), 0.0, atol=1e-7)
  c = optim.make_lr_schedule(2.0, steps=10, warmup_steps=0, kind="constant")
  assert [float(c(i)) for i in (0, 5, 9)] == [2.0, 2.0, 2.0]
  with pytest.raises(ValueError, match="lr_schedule"):
    optim.make_lr_schedule(1.0, 10, 0, "linear")


def test_ema_and_weight_decay_mask():
  ema = {"w": jnp.zeros(2)}
  params = {"w": jnp.ones(2)}
  # Step 0: rate min(0.999, 1/10) = 0.1, so the EMA moves 90% of the way.
  np.testing.assert_allclose(optim.ema_update(ema, params, 0, 0.999)["w"], 0.9, rtol=1e-6)
  # Late steps: the configured decay.
  np.testing.assert_allclose(optim.ema_update(ema, params, 10**6, 0.9)["w"], 0.1, rtol=1e-5)
  mask = optim.weight_decay_mask({"dense": {"kernel": 1, "bias": 2}, "tok_emb": {"embedding": 3},
                                  "pos_emb": 4, "ln": {"scale": 5}})
  assert mask == {"dense": {"kernel": True, "bias": False}, "tok_emb": {"embedding": True},
                  "pos_emb": False, "ln": {"scale": False}}


def test_evaluate_val_loss_padding_and_determinism():
  from dimo_jax.networks import maskgit
  model = maskgit.MaskTransformer(codebook_size=5, seq_len=6, num_classes=2, width=16, depth=1, heads=2, mlp_dim=32)
  params = jax.jit(lambda k: maskgit.init_params(model, k))(jax.random.key(0))
  apply_fn = conditioning.make_apply_fn(model)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 5, (10, 6)).astype(np.int32)
  labels = rng.integers(0, 2, (10,)).astype(np.int32)
  key = jax.random.key(3)
  kw = dict(mask_id=5, null_label=2, key=key, schedule="linear")
  a = mdm.evaluate_val_loss(apply_fn, params, tokens, labels, batch_size=4, **kw)
  b = mdm.evaluate_val_loss(apply_fn, params, tokens, labels, batch_size=4, **kw)
  assert a == b
  # Known answer: the same sum computed batch by batch by hand (masks from fold_in(key, i)).
  from dimo_jax.core import losses, masking

  @jax.jit
  def batch_ce(tok, lab, k):
    x_t, mask, _ = masking.forward_mask(k, tok, 5, "linear", exact=True)
    return losses.token_cross_entropy(apply_fn(params, x_t, lab), jax.nn.one_hot(tok, 6)), mask

  total, count = 0.0, 0.0
  for i, start in enumerate(range(0, 10, 4)):
    tok = np.zeros((4, 6), np.int32)
    lab = np.full((4,), 2, np.int32)
    n = min(4, 10 - start)
    tok[:n], lab[:n] = tokens[start:start + n], labels[start:start + n]
    ce, mask = batch_ce(tok, lab, jax.random.fold_in(key, i))
    m = np.asarray(mask)[:n]
    total += float(np.sum(np.asarray(ce)[:n] * m))
    count += m.sum()
  np.testing.assert_allclose(a["val_loss"], total / count, rtol=1e-5)
  c = mdm.evaluate_val_loss(apply_fn, params, tokens, labels, batch_size=4, mask_id=5, null_label=2,
                              key=jax.random.key(4), schedule="linear")
  assert c["val_loss"] != a["val_loss"]


def test_bad_config_errors(tmp_path):
  cfg = tiny_config(steps=5)
  cfg.train.batch_size = 5000
  with pytest.raises(ValueError, match="fewer than one global batch"):
    teacher.train_teacher(cfg, str(tmp_path / "big"))
  cfg = tiny_config(steps=5)
  cfg.model.arch = "bert"
  with pytest.raises(ValueError, match="label_dropout"):
    teacher.train_teacher(cfg, str(tmp_path / "bert"))


# ---------------------------------------------------------------------------- mode=distill
DISTILL_STEPS = 12


def distill_config(teacher_dir, steps=DISTILL_STEPS):
  c = tiny_config()
  c.mode = "distill"
  c.teacher.checkpoint = str(teacher_dir)
  c.teacher.guidance = 2.0
  c.distill.steps = steps
  c.distill.batch_size = 8
  c.distill.warmup_steps = 2
  c.distill.gen_lr = 1e-3
  c.distill.aux_lr = 1e-3
  c.distill.checkpoint_every = 4
  c.distill.log_every = 4
  c.distill.sample_every = steps
  c.distill.gen_dropout = True  # dropout randomness must also be reproduced on resume
  c.distill.freeze = ("tok_emb",)  # the authors' freezing is honoured through a resume
  c.distill.evaluate_at_end = False
  return c


def test_distill_resume_equals_uninterrupted_and_writes_generator(full_run, tmp_path):
  from dimo_jax.storage import loaders
  _, teacher_dir, _ = full_run
  cfg = distill_config(teacher_dir)
  out = distill.train_distill(cfg, str(tmp_path / "full"))
  assert out["step"] == DISTILL_STEPS and np.isfinite(out["gen/grad_norm"]) and out["gen/nan_count"] == 0
  assert os.path.isfile(tmp_path / "full" / "samples" / "teacher.png")
  assert os.path.isfile(tmp_path / "full" / "samples" / f"generator_{DISTILL_STEPS:07d}.png")
  # Killed after step 10 (latest checkpoint 8), then rerun to the end.
  part = distill.train_distill(cfg, str(tmp_path / "resumed"), stop_after=10)
  assert part["step"] == 10
  assert not os.path.isdir(loaders.generator_dir(tmp_path / "resumed"))  # only a finished run writes it
  distill.train_distill(cfg, str(tmp_path / "resumed"))
  m1, g1, stored = loaders.load_generator(tmp_path / "full")
  m2, g2, _ = loaders.load_generator(tmp_path / "resumed")
  assert stored["role"] == "generator" and m1 == m2
  assert _leaves_equal(g1, g2)
  # The generator moved away from the teacher.
  _, t_params, _ = loaders.load_teacher(teacher_dir)
  assert not _leaves_equal(g1["blocks"], t_params["blocks"])
  # Frozen parameters stayed at the teacher's values.
  assert _leaves_equal(g1["tok_emb"], t_params["tok_emb"])


def test_distill_missing_teacher_fails_clearly(tmp_path):
  cfg = distill_config(tmp_path / "no_such_teacher")
  with pytest.raises(FileNotFoundError, match="no_such_teacher"):
    distill.train_distill(cfg, str(tmp_path / "run"))


def test_shipped_digits_teacher_reproduces_its_recorded_val_loss():
  """pretrained/digits_teacher/README.md records 1.44486 (see the command there)."""
  from dimo_jax.data import datasets
  from dimo_jax.storage import loaders
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  model, params, stored = loaders.load_teacher(os.path.join(root, "pretrained", "digits_teacher"))
  cfg = digits.get_config()
  assert stored["model"]["width"] == model.width == cfg.model.width
  ds = datasets.load_dataset(cfg.data)
  out = mdm.evaluate_val_loss(conditioning.make_apply_fn(model), params, ds.val_tokens, ds.val_labels,
                                mask_id=ds.vocab_size, null_label=ds.num_classes,
                                key=jax.random.fold_in(jax.random.key(int(stored["seed"])), 2),
                                batch_size=int(stored["train"]["batch_size"]), schedule="arccos", exact=True)
  assert out["val_loss"] == pytest.approx(1.44486, abs=2e-4)
  assert out["val_acc"] == pytest.approx(0.5733, abs=1e-3)
