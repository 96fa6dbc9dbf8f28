"""Tiny runs of every model family (teacher and distillation), shared by ``test_one_path.py`` and
``test_faults.py``, and the per-leaf fingerprint that compares their parameters bit for bit.

``python tests/family_runs.py <out.npz>`` wrote the fingerprints of every case through the
per-family modes of commit eaf833c (``_old_paths``): ``tests/data/family_steps_golden.npz``. Those
modules are gone since; ``_old_paths`` is kept as the record of how the golden values were made."""
import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import captioned_digits, meissonic as meissonic_config, tokens as tokens_config  # noqa: E402
from dimo_jax.core.trees import flatten  # noqa: E402
from dimo_jax.storage import checkpoints  # noqa: E402

FAMILIES = ("classes", "captioned_digits", "meissonic")
N, L, K = 64, 8, 6


def token_data(folder):
  """64 sequences of 8 tokens over 6 codes, the first token the label (2 classes)."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, N).astype(np.int32)
  toks = rng.integers(0, K, (N, L)).astype(np.int32)
  toks[:, 0] = labels
  os.makedirs(folder, exist_ok=True)
  np.save(os.path.join(folder, "tokens.npy"), toks)
  np.save(os.path.join(folder, "labels.npy"), labels)
  return os.path.join(folder, "tokens.npy"), os.path.join(folder, "labels.npy")


# The golden fingerprints were written before the attention's fused backward pass
# (``networks.attention``); ``xla_saved`` computes the gradients as the code did then, bit for bit.
# The fused default equals it within float tolerance (``tests/test_attention.py``).
ATTENTION = "xla_saved"


def _cadence(section, steps):
  section.steps, section.log_every = steps, 1
  section.checkpoint_every, section.keep_checkpoints = 2, 3


def classes_config(folder, mode="teacher", steps=4):
  """``configs/tokens.py`` at 16 wide, one layer, on ``token_data``."""
  tok, lab = token_data(os.path.join(folder, "data"))
  c = tokens_config.get_config()
  c.mode = mode
  c.data.path, c.data.labels = tok, lab
  c.model.width, c.model.depth, c.model.heads, c.model.mlp_dim = 16, 1, 2, 32
  c.model.attention_impl = ATTENTION
  _cadence(c.train, steps)
  c.train.batch_size, c.train.warmup_steps, c.train.eval_every = 8, 1, 0
  c.train.mask_schedule = "arccos"  # the masking the golden fingerprints were recorded with
  _cadence(c.distill, steps)
  c.distill.batch_size, c.distill.warmup_steps, c.distill.aux_updates = 8, 1, 1
  c.distill.sample_every, c.distill.evaluate_at_end = 0, False
  return c


def captioned_config(folder, mode="teacher", steps=4):
  """``configs/captioned_digits.py`` with one double and one single block, batch 8."""
  del folder
  c = captioned_digits.get_config()
  c.mode = mode
  c.model.num_layers = c.model.num_single_layers = 1
  c.model.attention_impl = ATTENTION
  _cadence(c.train, steps)
  c.train.batch_size, c.train.warmup_steps = 8, 1
  _cadence(c.distill, steps)
  c.distill.batch_size, c.distill.aux_updates, c.distill.warmup_steps = 8, 1, 0
  c.distill.evaluate_at_end = False
  return c


def meissonic_release(folder):
  """Converted tiny random Meissonic networks and a tokenizer (``test_sample_text``'s layout)."""
  import test_sample_text as t  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from dimo_jax.networks import clip_text, meissonic, meissonic_vq  # pylint: disable=import-outside-toplevel
  root = os.path.join(folder, "release")
  if os.path.isdir(root):
    return root
  key = jax.random.PRNGKey(0)
  t._write_converted(os.path.join(root, "transformer"), "meissonic", t.TRANSFORMER, t._random_params(
      lambda: meissonic.init_params(t.TRANSFORMER, key, text_len=t.CLIP.max_positions), 0))
  t._write_converted(os.path.join(root, "vqvae"), "meissonic-vq", t.VQ, t._random_params(
      lambda: meissonic_vq.MeissonicVQModel(t.VQ).init(key, jnp.zeros((1, 4, 4, 3)))["params"], 1))
  t._write_converted(os.path.join(root, "text_encoder"), "clip-text", t.CLIP, t._random_params(
      lambda: clip_text.CLIPTextModel(t.CLIP).init(key, jnp.zeros((1, t.CLIP.max_positions), jnp.int32))["params"],
      2))
  t._write_tokenizer(os.path.join(root, "Meissonic", "tokenizer"))
  with open(os.path.join(root, "prompts.txt"), "w") as f:
    f.write("a cat on a mat\nsat on a cat\na cat\n")
  return root


def meissonic_cfg(folder, mode="distill", steps=4):
  """``configs/meissonic.py`` on ``meissonic_release``: float32, 32 px (8 x 8 tokens), batch 2."""
  root = meissonic_release(folder)
  c = meissonic_config.get_config()
  c.mode = mode
  c.meissonic.transformer = os.path.join(root, "transformer")
  c.meissonic.vqvae = os.path.join(root, "vqvae")
  c.meissonic.text_encoder = os.path.join(root, "text_encoder")
  c.meissonic.tokenizer = os.path.join(root, "Meissonic", "tokenizer")
  c.meissonic.source = os.path.join(root, "Meissonic")
  c.meissonic.dtype = c.meissonic.param_dtype = "float32"
  c.meissonic.attention_impl = ATTENTION
  c.sample.resolution, c.sample.batch_size = 32, 2
  c.distill.prompts = os.path.join(root, "prompts.txt")
  _cadence(c.distill, steps)
  c.distill.batch_size, c.distill.aux_updates, c.distill.warmup_steps = 2, 1, 0
  c.distill.compute_dtype, c.distill.param_dtype, c.distill.remat = "float32", "float32", "none"
  c.distill.gen_lr = c.distill.aux_lr = 1e-3
  c.mesh.fsdp = 1
  return c


CONFIGS = {"classes": classes_config, "captioned_digits": captioned_config, "meissonic": meissonic_cfg}


def fingerprint(params) -> dict:
  """``{leaf path: (sha1 of its float32 bytes, float64 sum)}``."""
  out = {}
  for k, v in sorted(flatten(params).items()):
    a = np.ascontiguousarray(np.asarray(v, np.float32))
    out[k] = (hashlib.sha1(a.tobytes()).hexdigest(), float(np.sum(a, dtype=np.float64)))
  return out


def folder_fingerprint(path, ema=True) -> dict:
  params, ema_params, _ = checkpoints.load_params(path)
  return fingerprint(ema_params if ema and ema_params is not None else params)


def as_arrays(prefix: str, fp: dict) -> dict:
  names = sorted(fp)
  return {f"{prefix}/names": np.asarray(names), f"{prefix}/sha1": np.asarray([fp[n][0] for n in names]),
          f"{prefix}/sums": np.asarray([fp[n][1] for n in names], np.float64)}


def from_arrays(golden, prefix: str) -> dict:
  return {str(n): (str(h), float(s)) for n, h, s in
          zip(golden[f"{prefix}/names"], golden[f"{prefix}/sha1"], golden[f"{prefix}/sums"])}


STEPS = 2  # teacher and distillation steps of the golden cases


def _old_paths(tmp):
  """The fingerprints of every case through the modules as they were before the families layer."""
  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import distill, distill_meissonic, distill_text, teacher, teacher_text
  out = {}
  c = classes_config(os.path.join(tmp, "classes"), "teacher", STEPS)
  teacher.train_teacher(c, os.path.join(tmp, "classes", "teacher"))
  out.update(as_arrays("classes/teacher", folder_fingerprint(os.path.join(tmp, "classes", "teacher"))))
  c = classes_config(os.path.join(tmp, "classes"), "distill", STEPS)
  c.teacher.checkpoint = os.path.join(tmp, "classes", "teacher")
  distill.train_distill(c, os.path.join(tmp, "classes", "distill"))
  out.update(as_arrays("classes/generator", folder_fingerprint(os.path.join(tmp, "classes", "distill", "generator"))))

  c = captioned_config(tmp, "teacher", STEPS)
  c.train.steps = STEPS
  teacher_text.train_text_teacher(c, os.path.join(tmp, "captioned", "teacher"))
  out.update(as_arrays("captioned_digits/teacher", folder_fingerprint(os.path.join(tmp, "captioned", "teacher"))))
  c = captioned_config(tmp, "distill", STEPS)
  c.teacher.checkpoint = os.path.join(tmp, "captioned", "teacher")
  distill_text.train_distill_text(c, os.path.join(tmp, "captioned", "distill"))
  out.update(as_arrays("captioned_digits/generator",
                       folder_fingerprint(os.path.join(tmp, "captioned", "distill", "generator"))))

  c = meissonic_cfg(os.path.join(tmp, "meissonic"), "distill", STEPS)
  distill_meissonic.train_distill_meissonic(c, os.path.join(tmp, "meissonic", "distill"))
  out.update(as_arrays("meissonic/generator",
                       folder_fingerprint(os.path.join(tmp, "meissonic", "distill", "generator"))))
  return out


if __name__ == "__main__":
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    arrays = _old_paths(d)
  np.savez(sys.argv[1], **arrays)
  print("wrote", sys.argv[1], len(arrays))
