"""Text-to-image sampling end to end at tiny size (``mode=sample`` with ``configs/meissonic.py``):
converted folders of tiny random networks and tiny tokenizer files written here, a prompt file ->
one PNG per prompt, ``index.jsonl``, ``grid.png``; the config's defaults; and the errors for a
missing or wrong folder, a missing tokenizer file and an empty prompt file."""
import json
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import meissonic as meissonic_config
from dimo_jax import main
from dimo_jax.evaluation import text_to_image as sample_text
from dimo_jax.networks import clip_text, meissonic, meissonic_vq

TRANSFORMER = meissonic.MeissonicConfig.tiny(text_dim=32)  # 8 x 8 tokens, codebook 32
CLIP = clip_text.CLIPTextConfig.tiny(vocab_size=80, projection_dim=32)  # 16 positions
VQ = meissonic_vq.MeissonicVQConfig.tiny()  # f = 4, 32 codes: 8 x 8 tokens -> 32 x 32 pixels
PROMPTS = ["A cat on a mat!", "sat, on... a CAT", "Ünïcödé cat / sat"]


def _write_converted(folder, kind, config, params):
  """A folder as ``python -m dimo_jax.convert <kind>`` writes it."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "params.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes({"params": jax.tree_util.tree_map(np.asarray, params)}))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"kind": kind, "config": config.to_dict(), "source": "test"}, f)


def _random_params(init, seed):
  """Random parameters of the shapes ``init`` gives (``jax.eval_shape``: nothing is compiled):
  norm scales near 1, biases near 0, other leaves ``N(0, 1 / fan_in)`` with ``fan_in`` the
  second-to-last axis, so that every weight (the zero-initialised AdaLN modulation included,
  and with it the text condition) matters."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init)

  def leaf(path, s):
    name = str(path[-1].key)
    if name == "scale":
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if name == "bias":
      return (0.05 * rng.standard_normal(s.shape)).astype(np.float32)
    fan_in = s.shape[-2] if len(s.shape) >= 2 and name != "embedding" else 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _write_tokenizer(folder):
  """A byte-level CLIP-style BPE vocabulary (letters, letters + '</w>', a few merges)."""
  os.makedirs(folder, exist_ok=True)
  chars = list("abcdefghijklmnopqrstuvwxyz!.,/")
  vocab = {}
  for ch in chars + [c + "</w>" for c in chars]:
    vocab[ch] = len(vocab)
  merges = [("c", "a"), ("ca", "t</w>"), ("s", "a"), ("sa", "t</w>"), ("o", "n</w>")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)   # the largest id: CLIP pools at argmax(ids)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """Converted tiny networks and the tokenizer folder, written once."""
  root = tmp_path_factory.mktemp("meissonic_release")
  key = jax.random.PRNGKey(0)
  t_params = _random_params(
      lambda: meissonic.init_params(TRANSFORMER, key, text_len=CLIP.max_positions), 0)
  _write_converted(root / "transformer", "meissonic", TRANSFORMER, t_params)
  vq_params = _random_params(lambda: meissonic_vq.MeissonicVQModel(VQ).init(
      key, jnp.zeros((1, 4, 4, 3)))["params"], 1)
  _write_converted(root / "vqvae", "meissonic-vq", VQ, vq_params)
  clip_params = _random_params(lambda: clip_text.CLIPTextModel(CLIP).init(
      key, jnp.zeros((1, CLIP.max_positions), jnp.int32))["params"], 2)
  _write_converted(root / "text_encoder", "clip-text", CLIP, clip_params)
  _write_tokenizer(root / "Meissonic" / "tokenizer")
  return root


def _config(release, prompts_file, **sample):
  c = meissonic_config.get_config()
  c.meissonic.transformer = str(release / "transformer")
  c.meissonic.vqvae = str(release / "vqvae")
  c.meissonic.text_encoder = str(release / "text_encoder")
  c.meissonic.tokenizer = str(release / "Meissonic" / "tokenizer")
  c.meissonic.source = str(release / "Meissonic")
  c.meissonic.dtype = "float32"
  c.meissonic.param_dtype = "float32"
  c.sample.prompts = str(prompts_file)
  c.sample.resolution = 32
  c.sample.steps = 4
  c.sample.batch_size = 2
  c.sample.grid_columns = 2
  c.sample.grid_image_size = 16
  c.sample.update(sample)
  return c


def test_config_defaults():
  c = meissonic_config.get_config()
  assert c.mode == "sample" and c.sample.model == "meissonic"
  assert (c.sample.steps, c.sample.guidance, tuple(c.sample.temperature)) == (48, 9.0, (2.0, 0.0))
  assert tuple(c.sample.micro_conds) == (1024, 1024, 0, 0, 6)
  assert c.sample.negative_prompt.startswith("worst quality, low quality, low res, blurry")
  assert c.sample.negative_prompt.endswith("duplicate, ugly, identifying mark")
  assert (c.meissonic.dtype, c.meissonic.vq_dtype) == ("bfloat16", "float32")
  assert (c.distill.r_init, c.distill.sigma, c.distill.divergence) == ("fix_0.5", 0.3, "fkl")


def test_names_recover_the_prompt():
  assert sample_text.image_name(3, "A cat, on a MAT!") == "00003_a-cat-on-a-mat.png"
  assert sample_text.prompt_slug("Ünïcödé  cat") == "unicode-cat"
  assert sample_text.prompt_slug("!!!") == "prompt"
  long = sample_text.prompt_slug("word " * 40)
  assert len(long) <= sample_text.SLUG_CHARS and long.startswith("word-word")


def test_prompts_to_pngs_index_and_grid(release, tmp_path):
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
  out = main.run(_config(release, prompts_file, seed=7), str(tmp_path / "work"))
  folder = tmp_path / "work" / "samples"
  assert out["output"] == str(folder) and out["num"] == 3
  records = [json.loads(line) for line in (folder / "index.jsonl").read_text("utf-8").splitlines()]
  assert [r["prompt"] for r in records] == PROMPTS
  assert [r["seed"] for r in records] == [7, 8, 9]
  assert [r["file"] for r in records] == ["00000_a-cat-on-a-mat.png", "00001_sat-on-a-cat.png",
                                          "00002_unicode-cat-sat.png"]
  images = [np.asarray(Image.open(folder / r["file"])) for r in records]
  assert all(im.shape == (32, 32, 3) and im.dtype == np.uint8 for im in images)
  assert not np.array_equal(images[0], images[1])
  grid = np.asarray(Image.open(folder / "grid.png"))
  assert grid.shape == (32, 32, 3)   # 2 x 2 cells of 16 px, the last one empty
  assert (grid[16:, 16:] == 0).all()
  settings = json.loads((folder / "settings.json").read_text())
  assert settings["steps"] == 4 and settings["guidance"] == 9.0 and settings["resolution"] == 32

  # The third image again from its recorded seed, beside another prompt in its batch.
  again_file = tmp_path / "again.txt"
  again_file.write_text("a dog\n" + PROMPTS[2] + "\n", encoding="utf-8")
  again = main.run(_config(release, again_file, seed=8, output=str(tmp_path / "again")),
                   str(tmp_path / "work2"))
  assert os.path.basename(again["images"][1]) == "00001_unicode-cat-sat.png"
  np.testing.assert_array_equal(np.asarray(Image.open(again["images"][1])), images[2])


def test_clear_errors(release, tmp_path):
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("a cat\n")
  work = str(tmp_path / "work")

  c = _config(release, prompts_file)
  c.meissonic.transformer = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"nowhere' does not exist .*\n.*python -m "
                     r"dimo_jax.convert meissonic --input=.*Meissonic/transformer --output=.*nowhere"):
    main.run(c, work)

  c = _config(release, prompts_file)   # a converted folder of another kind
  c.meissonic.text_encoder = c.meissonic.vqvae
  with pytest.raises(FileNotFoundError, match="holds a converted meissonic-vq model, not clip-text"):
    main.run(c, work)

  released = tmp_path / "released_vqvae"   # a released folder that was never converted
  released.mkdir()
  (released / "config.json").write_text("{}")
  c = _config(release, prompts_file)
  c.meissonic.vqvae = str(released)
  with pytest.raises(FileNotFoundError, match="has no params.msgpack .*\n.*convert meissonic-vq"):
    main.run(c, work)

  tokenizer = tmp_path / "tokenizer"
  shutil.copytree(release / "Meissonic" / "tokenizer", tokenizer)
  os.remove(tokenizer / "merges.txt")
  c = _config(release, prompts_file)
  c.meissonic.tokenizer = str(tokenizer)
  with pytest.raises(FileNotFoundError, match="missing merges.txt"):
    main.run(c, work)

  empty = tmp_path / "empty.txt"
  empty.write_text("\n   \n")
  with pytest.raises(ValueError, match="empty.txt: the prompt file is empty"):
    main.run(_config(release, empty), work)
  with pytest.raises(ValueError, match="config.sample.prompts is not set"):
    main.run(_config(release, ""), work)
  with pytest.raises(FileNotFoundError, match="prompt file not found"):
    main.run(_config(release, tmp_path / "absent.txt"), work)
  with pytest.raises(ValueError, match="micro_conds must hold 5 values"):
    main.run(_config(release, prompts_file, micro_conds=(1.0, 2.0)), work)
  with pytest.raises(ValueError, match="resolution=36 must be a multiple of 8 pixels"):
    main.run(_config(release, prompts_file, resolution=36), work)
