"""Meissonic VQ model: layout, conversion of released files, parity with a PyTorch model."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.converters import meissonic_vq as conv
from dimo_jax.converters.common import flatten
from dimo_jax.converters.safetensors_io import save_safetensors
from dimo_jax.networks import meissonic_vq as vq

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

TINY = vq.MeissonicVQConfig.tiny()


# ------------------------------------------------------------ PyTorch reference (diffusers names)


class _Resnet(tnn.Module):

  def __init__(self, cin, cout, groups):
    super().__init__()
    self.norm1 = tnn.GroupNorm(groups, cin, eps=1e-6)
    self.conv1 = tnn.Conv2d(cin, cout, 3, padding=1)
    self.norm2 = tnn.GroupNorm(groups, cout, eps=1e-6)
    self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1)
    self.conv_shortcut = tnn.Conv2d(cin, cout, 1) if cin != cout else None

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class _Down(tnn.Module):

  def __init__(self, ch):
    super().__init__()
    self.conv = tnn.Conv2d(ch, ch, 3, stride=2, padding=0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(tnn.Module):

  def __init__(self, ch):
    super().__init__()
    self.conv = tnn.Conv2d(ch, ch, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Block(tnn.Module):

  def __init__(self, cin, cout, n, groups, down=False, up=False):
    super().__init__()
    self.resnets = tnn.ModuleList(
        [_Resnet(cin if j == 0 else cout, cout, groups) for j in range(n)])
    if down:
      self.downsamplers = tnn.ModuleList([_Down(cout)])
    if up:
      self.upsamplers = tnn.ModuleList([_Up(cout)])

  def forward(self, x):
    for r in self.resnets:
      x = r(x)
    for s in list(getattr(self, "downsamplers", [])) + list(getattr(self, "upsamplers", [])):
      x = s(x)
    return x


class _Encoder(tnn.Module):

  def __init__(self, c):
    super().__init__()
    ch = c.block_out_channels
    self.conv_in = tnn.Conv2d(c.in_channels, ch[0], 3, padding=1)
    self.down_blocks = tnn.ModuleList(
        [_Block(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c.norm_num_groups,
                down=i < len(ch) - 1) for i in range(len(ch))])
    self.mid_block = _Block(ch[-1], ch[-1], 2, c.norm_num_groups)
    self.conv_norm_out = tnn.GroupNorm(c.norm_num_groups, ch[-1], eps=1e-6)
    self.conv_out = tnn.Conv2d(ch[-1], c.latent_channels, 3, padding=1)

  def forward(self, x):
    x = self.conv_in(x)
    for b in self.down_blocks:
      x = b(x)
    return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class _Decoder(tnn.Module):

  def __init__(self, c):
    super().__init__()
    rev = tuple(reversed(c.block_out_channels))
    self.conv_in = tnn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
    self.mid_block = _Block(rev[0], rev[0], 2, c.norm_num_groups)
    self.up_blocks = tnn.ModuleList(
        [_Block(rev[max(i - 1, 0)], rev[i], c.layers_per_block + 1, c.norm_num_groups,
                up=i < len(rev) - 1) for i in range(len(rev))])
    self.conv_norm_out = tnn.GroupNorm(c.norm_num_groups, rev[-1], eps=1e-6)
    self.conv_out = tnn.Conv2d(rev[-1], c.out_channels, 3, padding=1)

  def forward(self, x):
    x = self.mid_block(self.conv_in(x))
    for b in self.up_blocks:
      x = b(x)
    return self.conv_out(F.silu(self.conv_norm_out(x)))


class _Quantize(tnn.Module):

  def __init__(self, n, d):
    super().__init__()
    self.embedding = tnn.Embedding(n, d)


class TorchVQModel(tnn.Module):
  """diffusers VQModel as Meissonic uses it (encode + cdist argmin; lookup + decode)."""

  def __init__(self, c):
    super().__init__()
    self.encoder = _Encoder(c)
    self.quant_conv = tnn.Conv2d(c.latent_channels, c.embed_dim, 1)
    self.quantize = _Quantize(c.num_vq_embeddings, c.embed_dim)
    self.post_quant_conv = tnn.Conv2d(c.embed_dim, c.latent_channels, 1)
    self.decoder = _Decoder(c)

  def encode_ids(self, x):
    h = self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1)
    flat = h.reshape(-1, h.shape[-1])
    dist = torch.cdist(flat, self.quantize.embedding.weight)
    return torch.argmin(dist, dim=1).reshape(h.shape[:3])

  def decode_ids(self, ids):
    z = self.quantize.embedding(ids).permute(0, 3, 1, 2)
    return self.decoder(self.post_quant_conv(z))


def _torch_model(config, seed=0):
  torch.manual_seed(seed)
  model = TorchVQModel(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _diffusers_config(c):
  n = len(c.block_out_channels)
  return {"_class_name": "VQModel", "_diffusers_version": "0.30.2", "act_fn": "silu",
          "block_out_channels": list(c.block_out_channels),
          "down_block_types": ["DownEncoderBlock2D"] * n,
          "force_upcast": True, "in_channels": c.in_channels, "latent_channels": c.latent_channels,
          "layers_per_block": c.layers_per_block, "lookup_from_codebook": True,
          "mid_block_add_attention": False, "norm_num_groups": c.norm_num_groups,
          "norm_type": "group",
          "num_vq_embeddings": c.num_vq_embeddings, "out_channels": c.out_channels,
          "sample_size": 32, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * n,
          "vq_embed_dim": None}


def _write_release(folder, model, config, fp16_beside=True):
  os.makedirs(folder, exist_ok=True)
  sd = _state_dict(model)
  save_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), sd)
  if fp16_beside:
    save_safetensors(os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"),
                     {k: v.astype(np.float16) for k, v in sd.items()})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(_diffusers_config(config), f)
  return sd


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ------------------------------------------------------------------ tests


def test_full_size_layout_and_param_count():
  config = vq.MeissonicVQConfig()
  layout = conv.meissonic_vq_layout(config)
  assert len(layout) == 277
  assert sum(int(np.prod(s)) for s in layout.values()) == 146_244_675
  assert vq.param_count(config) == 146_244_675  # jax.eval_shape, nothing allocated
  flat = {k: tuple(v.shape) for k, v in flatten(vq.abstract_params(config)).items()}
  assert flat == conv.flax_layout(config)
  decoder = sum(int(np.prod(s)) for k, s in layout.items() if k.startswith("decoder."))
  assert decoder == 87_018_499
  assert layout["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] == (512, 768, 1, 1)
  assert "decoder.up_blocks.4.upsamplers.0.conv.weight" not in layout


def test_torch_reference_has_the_released_key_names():
  model = _torch_model(TINY)
  got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert got == conv.meissonic_vq_layout(TINY)


def test_decode_and_encode_match_pytorch_through_the_released_files(tmp_path):
  model = _torch_model(TINY)
  _write_release(tmp_path / "Meissonic" / "vqvae", model, TINY)
  out = conv.convert_meissonic_vq(str(tmp_path / "Meissonic"), str(tmp_path / "vq_jax"))
  jmodel, params = conv.load_meissonic_vq(out)
  assert jmodel.config == TINY
  variables = {"params": params}

  rng = np.random.default_rng(0)
  ids = rng.integers(0, TINY.num_vq_embeddings, size=(2, 4, 5))
  with torch.no_grad():
    want = model.decode_ids(torch.from_numpy(ids)).permute(0, 2, 3, 1).numpy()
  decode = jax.jit(lambda v, i: jmodel.apply(v, i, clip=False, method="decode_ids"))
  raw = decode(variables, jnp.asarray(ids))
  assert raw.shape == (2, 16, 20, 3)
  print(f"decode relative error: {_rel(raw, want):.2e}")
  assert _rel(raw, want) <= 1e-5
  masked = ids.copy()
  masked[0, 0, 0] = TINY.num_vq_embeddings  # a mask id is clamped to the last code
  clamped = ids.copy()
  clamped[0, 0, 0] = TINY.num_vq_embeddings - 1
  np.testing.assert_array_equal(decode(variables, jnp.asarray(masked)),
                                decode(variables, jnp.asarray(clamped)))

  images = rng.uniform(0, 1, size=(2, 16, 12, 3)).astype(np.float32)
  with torch.no_grad():
    want_ids = model.encode_ids(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  got_ids = jax.jit(lambda v, x: jmodel.apply(v, x, method="encode_ids"))(variables, images)
  assert got_ids.dtype == jnp.int32 and got_ids.shape == (2, 4, 3)
  np.testing.assert_array_equal(np.asarray(got_ids), want_ids)
  assert len(np.unique(want_ids)) > 1

  bf16 = vq.MeissonicVQModel(TINY, dtype=jnp.bfloat16)
  low = jax.jit(lambda v, i: bf16.apply(v, i, method="decode_ids"))(variables, jnp.asarray(ids))
  assert low.dtype == jnp.float32 and float(low.min()) >= 0.0 and float(low.max()) <= 1.0
  assert _rel(low, np.clip(want, 0, 1)) < 0.1


def test_config_from_the_released_json_and_from_shapes(tmp_path):
  released = _diffusers_config(vq.MeissonicVQConfig())
  assert conv.config_from_diffusers(released) == vq.MeissonicVQConfig()
  inferred = conv.infer_config(_state_dict(_torch_model(TINY)))
  assert (inferred.block_out_channels, inferred.layers_per_block, inferred.latent_channels,
          inferred.num_vq_embeddings) == (TINY.block_out_channels, 1, 8, 32)
  with pytest.raises(ValueError, match="mid_block_add_attention"):
    conv.config_from_diffusers({**released, "mid_block_add_attention": True})
  with pytest.raises(ValueError, match="not a diffusers VQModel"):
    conv.config_from_diffusers({**released, "_class_name": "Transformer2DModel"})


def test_strict_check_names_missing_unexpected_and_misshaped_keys():
  sd = _state_dict(_torch_model(TINY))
  sd["decoder.conv_in.weight"] = np.zeros((5, 8, 3, 3), np.float32)
  del sd["decoder.up_blocks.2.resnets.0.conv_shortcut.bias"]
  sd["decoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    conv.convert_state_dict(sd, TINY, source="vq.safetensors")
  msg = str(e.value)
  assert "wrong shape: decoder.conv_in.weight: got (5, 8, 3, 3), expected (32, 8, 3, 3)" in msg
  assert "missing keys (1): decoder.up_blocks.2.resnets.0.conv_shortcut.bias" in msg
  assert "unexpected keys (1): decoder.extra.weight" in msg
  assert "python -m dimo_jax.convert meissonic-vq" in msg


def test_clear_errors_for_wrong_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m dimo_jax.convert meissonic-vq "
                     r"--input=<Meissonic>/vqvae --output=.*nothing"):
    conv.load_meissonic_vq(str(tmp_path / "nothing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
    conv.convert_meissonic_vq(str(tmp_path / "empty"), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="not found"):
    conv.convert_meissonic_vq(str(tmp_path / "missing.safetensors"), str(tmp_path / "out"))
  (tmp_path / "model.bin").write_bytes(b"x")
  with pytest.raises(ValueError, match="only .safetensors"):
    conv.convert_meissonic_vq(str(tmp_path / "model.bin"), str(tmp_path / "out"))
  other = tmp_path / "other"
  other.mkdir()
  (other / "config.json").write_text(json.dumps({"kind": "clip-text", "config": {}}))
  (other / "params.msgpack").write_bytes(b"")
  with pytest.raises(ValueError, match="expected 'meissonic-vq'"):
    conv.load_meissonic_vq(str(other))


def test_shape_errors():
  model = vq.MeissonicVQModel(TINY)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="multiples of 4"):
    jax.eval_shape(lambda: model.init(key, jnp.zeros((1, 6, 8, 3)), method="encode_ids"))
  with pytest.raises(ValueError, match=r"ids must have shape \[B, h, w\]"):
    jax.eval_shape(lambda: model.init(key, jnp.zeros((1, 16), jnp.int32), method="decode_ids"))
