"""``python -m dimo_jax.convert meissonic | meissonic-vq | clip-text`` on a tiny released-layout
Meissonic folder (random PyTorch modules with the released key names, from the parity tests),
then ``mode=sample`` on what the three commands wrote: the user's path, at tiny size."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import test_clip_text
import test_meissonic
import test_meissonic_vq
import test_sample_text
from configs import meissonic as meissonic_config
from dimo_jax import convert, main
from dimo_jax.converters import clip_text as clip_conv
from dimo_jax.converters import commands
from dimo_jax.converters import meissonic as meissonic_conv
from dimo_jax.converters import meissonic_vq as vq_conv
from dimo_jax.converters.common import flatten
from dimo_jax.converters.safetensors_io import save_safetensors
from dimo_jax.networks import clip_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFORMER = test_meissonic.TINY   # text width 24, pooled 32, codebook 32
CLIP = clip_text.CLIPTextConfig.tiny(vocab_size=80, width=24, heads=4, mlp_dim=48, projection_dim=32)
VQ = test_meissonic_vq.TINY         # 32 codes


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """``<root>/Meissonic/{transformer,vqvae,text_encoder,tokenizer}`` in the released layout."""
  root = tmp_path_factory.mktemp("release") / "Meissonic"
  _, model = test_meissonic._torch_meissonic(TRANSFORMER)
  os.makedirs(root / "transformer")
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  save_safetensors(str(root / "transformer" / meissonic_conv.WEIGHTS_FILE), state)
  (root / "transformer" / "config.json").write_text(
      json.dumps(test_meissonic._diffusers_config(TRANSFORMER)))
  test_meissonic_vq._write_release(str(root / "vqvae"), test_meissonic_vq._torch_model(VQ), VQ)
  test_clip_text._write_release(str(root / "text_encoder"), test_clip_text._torch_model(CLIP), CLIP)
  test_sample_text._write_tokenizer(str(root / "tokenizer"))
  return {"root": root, "transformer_state": state}


def _same_params(a, b):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32))


def test_three_commands_then_sample(released, tmp_path):
  root, out = released["root"], tmp_path / "pretrained"
  # The transformer from the release folder, the VQ from its subfolder, CLIP from its file.
  assert convert.main(["meissonic", f"--input={root}", f"--output={out / 'transformer'}"]) == 0
  assert convert.main(["meissonic-vq", f"--input={root / 'vqvae'}", f"--output={out / 'vqvae'}"]) == 0
  assert convert.main(["clip-text", f"--input={root / 'text_encoder' / 'model.safetensors'}",
                       f"--output={out / 'text_encoder'}"]) == 0

  config, params = meissonic_conv.load_meissonic(str(out / "transformer"))
  assert config.grid == 64   # the released config.json has no token grid: the 1024 px default
  assert dataclasses.replace(config, grid=TRANSFORMER.grid) == TRANSFORMER
  _same_params(params, meissonic_conv.convert_meissonic_state_dict(released["transformer_state"],
                                                                   TRANSFORMER))
  vq_model, vq_params = vq_conv.load_meissonic_vq(str(out / "vqvae"))
  assert vq_model.config == VQ
  _same_params(vq_params, vq_conv.load_meissonic_vq(
      vq_conv.convert_meissonic_vq(str(root), str(tmp_path / "vq_direct")))[1])
  text_model, _ = clip_conv.load_clip_text(str(out / "text_encoder"))
  assert text_model.config == CLIP

  # What the three commands wrote is what configs/meissonic.py reads.
  c = meissonic_config.get_config()
  c.meissonic.source = str(root)
  c.meissonic.transformer = str(out / "transformer")
  c.meissonic.vqvae = str(out / "vqvae")
  c.meissonic.text_encoder = str(out / "text_encoder")
  c.meissonic.tokenizer = str(root / "tokenizer")
  commands.check_meissonic_paths(c)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a cat on a mat\nsat on a cat\n")
  c.sample.prompts = str(prompts)
  c.sample.steps = 2
  c.sample.resolution = 32   # 8 x 8 tokens with the tiny VQ's factor 4
  result = main.run(c, str(tmp_path / "work"))
  assert [os.path.basename(p) for p in result["images"]] == ["00000_a-cat-on-a-mat.png",
                                                              "00001_sat-on-a-cat.png"]
  assert np.asarray(Image.open(result["images"][0])).shape == (32, 32, 3)   # 8 x 8 tokens, f = 4
  assert os.path.isfile(result["grid"]) and os.path.isfile(result["index"])


def test_overwrite_and_param_dtype(released, tmp_path):
  root, out = released["root"], str(tmp_path / "t")
  assert convert.main(["meissonic", f"--input={root / 'transformer'}", f"--output={out}",
                       "--param_dtype=bfloat16"]) == 0
  config, params = meissonic_conv.load_meissonic(out)
  assert config.param_dtype == "bfloat16"
  assert params["mlm_layer"]["conv2"]["kernel"].dtype.name == "bfloat16"
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    convert.main(["meissonic", f"--input={root}", f"--output={out}"])
  assert convert.main(["meissonic", f"--input={root}", f"--output={out}", "--overwrite"]) == 0
  assert meissonic_conv.load_meissonic(out)[0].param_dtype == "float32"
  with pytest.raises(ValueError, match="meissonic transformer only"):
    convert.main(["clip-text", f"--input={root}", f"--output={tmp_path / 'c'}", "--param_dtype=bfloat16"])
  with pytest.raises(ValueError, match="not a dtype"):
    convert.main(["meissonic", f"--input={root}", f"--output={tmp_path / 'd'}", "--param_dtype=bf17"])
  with pytest.raises(FileNotFoundError, match="no .safetensors weights .*text_encoder"):
    convert.main(["clip-text", f"--input={root / 'tokenizer'}", f"--output={tmp_path / 'e'}"])


def test_command_line_errors_and_help(tmp_path, capsys):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "dimo_jax.convert", *args], cwd=ROOT,
                                     env=env, capture_output=True, text=True, timeout=300)
  bad = run("meissonic-vq", f"--input={tmp_path / 'nowhere'}", f"--output={tmp_path / 'o'}")
  assert bad.returncode == 2
  assert "error:" in bad.stderr and "nowhere: not found" in bad.stderr
  assert "python -m dimo_jax.convert meissonic-vq --input=<Meissonic>/vqvae" in bad.stderr
  assert not os.path.exists(tmp_path / "o")
  with pytest.raises(SystemExit):
    convert.main(["--help"])
  help_text = capsys.readouterr().out
  assert "meissonic-vq" in help_text and "clip-text" in help_text
  assert "--input=<Meissonic>/transformer" in help_text and "--param_dtype" in help_text


def test_convert_commands_name_the_release_subfolders():
  assert commands.convert_command("meissonic", "out") == (
      "python -m dimo_jax.convert meissonic --input=Meissonic/transformer --output=out")
  assert "--input=Meissonic/vqvae" in commands.convert_command("meissonic-vq", "o")
  assert "--input=Meissonic/text_encoder" in commands.convert_command("clip-text", "o")
