"""The MaskGIT path end to end on random weights at reduced size: a valeoai-layout state dict ->
converter -> Di[M]O with configs/maskgit.py -> one-step and teacher samples decoded by a converted
VQGAN into PNG files."""
import os

import jax
import numpy as np
from PIL import Image

from configs import maskgit
from dimo_jax import main
from dimo_jax.converters import maskgit_common, valeoai
from dimo_jax.networks import vqgan
from dimo_jax.storage import loaders

K, C, SIDE, WIDTH, DEPTH = 16, 4, 4, 32, 1  # 16 codes, 4 classes, 4x4 tokens


def random_valeoai_state_dict(rng):
  rows, positions = K + C + 2, SIDE * SIDE + 1
  layout = valeoai.valeoai_layout(depth=DEPTH, width=WIDTH, mlp_dim=4 * WIDTH, rows=rows, positions=positions)
  return {k: (0.05 * rng.standard_normal(shape)).astype(np.float32) for k, shape in layout.items()}


def test_convert_distill_sample_decode(tmp_path):
  rng = np.random.default_rng(0)
  params, kwargs = valeoai.convert_valeoai_state_dict(random_valeoai_state_dict(rng),
                                                      {"heads": 2, "codebook_size": K, "num_classes": C})
  teacher_dir = maskgit_common.save_converted(str(tmp_path / "teacher"), params, kwargs, arch="preln", kind="valeoai")
  vq_cfg = vqgan.TamingConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(SIDE,), resolution=2 * SIDE,
                              z_channels=8, embed_dim=8, n_embed=K, num_groups=4)
  vq_vars = vqgan.TamingVQGAN(vq_cfg).init(jax.random.key(0), np.zeros((1, 2 * SIDE, 2 * SIDE, 3), np.float32))
  vq_dir = loaders.save_vqgan(str(tmp_path / "vqgan"), vq_vars, "taming", vq_cfg)

  def config(**fields):
    c = maskgit.get_config("1")
    c.teacher.checkpoint = teacher_dir
    c.vqgan.checkpoint = vq_dir
    c.model.dtype = "float32"
    c.distill.steps = 2
    c.distill.batch_size = 4
    c.distill.warmup_steps = 1
    c.distill.checkpoint_every = 1
    c.distill.log_every = 1
    c.sample.num = 4
    c.sample.batch_size = 4
    c.sample.steps = 3
    for k, v in fields.items():
      section, key = k.split("__")
      c[section][key] = v
    return c

  workdir = str(tmp_path / "dimo")
  out = main.run(_with_mode(config(), "distill"), workdir)
  assert out["step"] == 2 and out["gen/nan_count"] == 0
  gen = main.run(_with_mode(config(sample__model="generator", sample__labels="0,1,2,3"), "sample"), workdir)
  teach = main.run(_with_mode(config(sample__checkpoint=teacher_dir, sample__output=str(tmp_path / "t.npy")),
                              "sample"), workdir)
  for written in (gen, teach):
    tokens = np.load(written["tokens"])
    assert tokens.shape == (4, SIDE * SIDE) and tokens.min() >= 0 and tokens.max() < K
    grid = Image.open(written["image"])
    assert grid.size[0] >= 2 * SIDE
    files = sorted(os.listdir(written["images_dir"]))
    assert len(files) == 4 and Image.open(os.path.join(written["images_dir"], files[0])).size == (2 * SIDE, 2 * SIDE)
  assert np.array_equal(np.load(gen["labels"]), [0, 1, 2, 3])


def _with_mode(c, mode):
  c.mode = mode
  return c
