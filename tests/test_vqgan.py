"""Tests for dimo_jax.networks.vqgan: Taming VQGAN (against a PyTorch reference) and Google's VQGAN layout."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.converters import google_vqgan, taming
from dimo_jax.networks import vqgan, vqgan_google

try:
  import torch
except ImportError:  # torch-based tests are skipped
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")

# Test configuration: 32 px -> 16 x 16 codes, attention at 16 (level 1 and middle), a channel
# change 32 -> 64 (nin_shortcut) in the encoder and 64 -> 32 in the decoder.
TAMING_CFG = vqgan.TamingConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(16,),
                                resolution=32, z_channels=24, embed_dim=16, n_embed=64)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------------------------------------
# Minimal PyTorch Taming VQModel (key names as in the released state dicts)
# ---------------------------------------------------------------------------------------------

if torch is not None:
  tnn = torch.nn
  F = torch.nn.functional

  def _t_norm(c):
    return tnn.GroupNorm(32, c, eps=1e-6, affine=True)

  def _t_swish(x):
    return x * torch.sigmoid(x)

  class TResnetBlock(tnn.Module):

    def __init__(self, cin, cout):
      super().__init__()
      self.norm1 = _t_norm(cin)
      self.conv1 = tnn.Conv2d(cin, cout, 3, padding=1)
      self.norm2 = _t_norm(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1)
      if cin != cout:
        self.nin_shortcut = tnn.Conv2d(cin, cout, 1)
      self.changes = cin != cout

    def forward(self, x):
      h = self.conv1(_t_swish(self.norm1(x)))
      h = self.conv2(_t_swish(self.norm2(h)))
      return (self.nin_shortcut(x) if self.changes else x) + h

  class TAttnBlock(tnn.Module):

    def __init__(self, c):
      super().__init__()
      self.norm = _t_norm(c)
      self.q, self.k, self.v, self.proj_out = (tnn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
      b, c, h, w = x.shape
      y = self.norm(x)
      q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)
      k = self.k(y).reshape(b, c, h * w)
      v = self.v(y).reshape(b, c, h * w).permute(0, 2, 1)
      att = torch.softmax(torch.bmm(q, k) / c**0.5, dim=-1)
      out = torch.bmm(att, v).permute(0, 2, 1).reshape(b, c, h, w)
      return x + self.proj_out(out)

  class TDownsample(tnn.Module):

    def __init__(self, c):
      super().__init__()
      self.conv = tnn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
      return self.conv(F.pad(x, (0, 1, 0, 1)))

  class TUpsample(tnn.Module):

    def __init__(self, c):
      super().__init__()
      self.conv = tnn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
      return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

  def _t_mid(c):
    mid = tnn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = TResnetBlock(c, c), TAttnBlock(c), TResnetBlock(c, c)
    return mid

  def _t_run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))

  class TEncoder(tnn.Module):

    def __init__(self, cfg):
      super().__init__()
      self.cfg = cfg
      self.conv_in = tnn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
      self.down = tnn.ModuleList()
      res, cin = cfg.resolution, cfg.ch
      for i, mult in enumerate(cfg.ch_mult):
        level = tnn.Module()
        level.block, level.attn = tnn.ModuleList(), tnn.ModuleList()
        for _ in range(cfg.num_res_blocks):
          level.block.append(TResnetBlock(cin, cfg.ch * mult))
          cin = cfg.ch * mult
          if res in cfg.attn_resolutions:
            level.attn.append(TAttnBlock(cin))
        if i != len(cfg.ch_mult) - 1:
          level.downsample = TDownsample(cin)
          res //= 2
        self.down.append(level)
      self.mid = _t_mid(cin)
      self.norm_out = _t_norm(cin)
      self.conv_out = tnn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
      h = self.conv_in(x)
      for i, level in enumerate(self.down):
        for j, block in enumerate(level.block):
          h = block(h)
          if len(level.attn):
            h = level.attn[j](h)
        if i != len(self.down) - 1:
          h = level.downsample(h)
      h = _t_run_mid(self.mid, h)
      return self.conv_out(_t_swish(self.norm_out(h)))

  class TDecoder(tnn.Module):

    def __init__(self, cfg):
      super().__init__()
      cin = cfg.ch * cfg.ch_mult[-1]
      res = cfg.resolution // 2**(len(cfg.ch_mult) - 1)
      self.conv_in = tnn.Conv2d(cfg.z_channels, cin, 3, padding=1)
      self.mid = _t_mid(cin)
      self.up = tnn.ModuleList()
      for i in reversed(range(len(cfg.ch_mult))):
        level = tnn.Module()
        level.block, level.attn = tnn.ModuleList(), tnn.ModuleList()
        for _ in range(cfg.num_res_blocks + 1):
          level.block.append(TResnetBlock(cin, cfg.ch * cfg.ch_mult[i]))
          cin = cfg.ch * cfg.ch_mult[i]
          if res in cfg.attn_resolutions:
            level.attn.append(TAttnBlock(cin))
        if i != 0:
          level.upsample = TUpsample(cin)
          res *= 2
        self.up.insert(0, level)
      self.norm_out = _t_norm(cin)
      self.conv_out = tnn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z):
      h = _t_run_mid(self.mid, self.conv_in(z))
      for i in reversed(range(len(self.up))):
        level = self.up[i]
        for j, block in enumerate(level.block):
          h = block(h)
          if len(level.attn):
            h = level.attn[j](h)
        if i != 0:
          h = level.upsample(h)
      return self.conv_out(_t_swish(self.norm_out(h)))

  class TVQModel(tnn.Module):

    def __init__(self, cfg):
      super().__init__()
      self.encoder, self.decoder = TEncoder(cfg), TDecoder(cfg)
      self.quantize = tnn.Module()
      self.quantize.embedding = tnn.Embedding(cfg.n_embed, cfg.embed_dim)
      self.quant_conv = tnn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
      self.post_quant_conv = tnn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def features(self, x):
      return self.quant_conv(self.encoder(x))

    def codes(self, x):
      z = self.features(x).permute(0, 2, 3, 1)
      flat = z.reshape(-1, z.shape[-1])
      e = self.quantize.embedding.weight
      d = (flat**2).sum(1, keepdim=True) - 2 * flat @ e.T + (e**2).sum(1)[None]
      return d.argmin(1).reshape(z.shape[:3])

    def decode_code(self, codes):
      q = self.quantize.embedding(codes).permute(0, 3, 1, 2)
      return self.decoder(self.post_quant_conv(q))


@pytest.fixture(scope="module")
def taming_reference():
  """A randomly initialised torch VQModel, an input batch, and its codes / features / decode."""
  torch.manual_seed(0)
  model = TVQModel(TAMING_CFG).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # non-trivial GroupNorm affine parameters
        p.add_(0.2 * torch.randn_like(p))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.features(x)
    flat = z.permute(0, 2, 3, 1).reshape(-1, TAMING_CFG.embed_dim)
    # Codebook near actual features so that many distinct codes are chosen.
    pick = torch.randperm(flat.shape[0])[:TAMING_CFG.n_embed]
    model.quantize.embedding.weight.copy_(flat[pick] + 0.05 * flat.std() * torch.randn_like(flat[pick]))
    codes = model.codes(x)
    dec = model.decode_code(codes)
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  return dict(state_dict=sd, x=x.permute(0, 2, 3, 1).numpy(), z=z.permute(0, 2, 3, 1).numpy(),
              codes=codes.numpy(), dec=dec.permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------------------------------------
# Taming VQGAN
# ---------------------------------------------------------------------------------------------


@needs_torch
def test_taming_matches_torch_reference(taming_reference):
  ref = taming_reference
  params = taming.convert_taming_state_dict(ref["state_dict"], TAMING_CFG)
  model = vqgan.TamingVQGAN(TAMING_CFG)

  @jax.jit
  def run(variables, x, tokens):
    with jax.default_matmul_precision("highest"):
      rec, codes = model.apply(variables, x)  # encode, then decode the chosen codes
      return codes, rec, vqgan.decode_tokens(variables, tokens, config=TAMING_CFG)

  tokens = jnp.asarray(ref["codes"].reshape(2, -1))
  codes, dec, img01 = run({"params": params}, jnp.asarray(ref["x"]), tokens)
  assert len(np.unique(ref["codes"])) > 10  # the comparison exercises many codes
  assert codes.dtype == jnp.int32 and codes.shape == (2, 16, 16)
  np.testing.assert_array_equal(np.asarray(codes), ref["codes"])
  assert dec.shape == (2, 32, 32, 3)
  assert _rel_err(dec, ref["dec"]) < 1e-5
  expected01 = np.clip((ref["dec"] + 1) / 2, 0, 1)
  np.testing.assert_allclose(np.asarray(img01), expected01, atol=1e-5)
  assert float(img01.min()) >= 0.0 and float(img01.max()) <= 1.0


@needs_torch
def test_load_taming_checkpoint_lightning_and_plain(taming_reference, tmp_path):
  sd = taming_reference["state_dict"]
  direct = taming.convert_taming_state_dict(sd, TAMING_CFG)
  lightning = dict(sd)
  lightning["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)  # ignored
  lightning["loss.logvar"] = torch.zeros(())
  ckpt = tmp_path / "last.ckpt"
  torch.save({"state_dict": lightning, "epoch": 3, "global_step": 10}, ckpt)
  plain = tmp_path / "vqgan.pth"
  torch.save(sd, plain)
  for path in (ckpt, plain):
    loaded = taming.load_taming_checkpoint(str(path), TAMING_CFG)
    assert set(loaded) == {"params"}
    flat_a = flax.traverse_util.flatten_dict(loaded["params"])
    flat_b = flax.traverse_util.flatten_dict(direct)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
      np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]))
  # A conv kernel is transposed from torch (out, in, kh, kw) to flax (kh, kw, in, out).
  w = sd["encoder.down.1.block.0.nin_shortcut.weight"].numpy()
  got = direct["encoder"]["down_1_block_0"]["nin_shortcut"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got), w.transpose(2, 3, 1, 0))
  with pytest.raises(FileNotFoundError, match="missing.ckpt"):
    taming.load_taming_checkpoint(str(tmp_path / "missing.ckpt"), TAMING_CFG)


def _numpy_taming_state_dict(cfg):
  return {k: np.zeros(shape, np.float32) for k, (_, shape) in taming.taming_param_layout(cfg).items()}


def test_taming_converter_rejects_bad_state_dicts():
  cfg = vqgan.TamingConfig.small()
  good = _numpy_taming_state_dict(cfg)
  good["loss.perceptual_loss.net.slice1.0.weight"] = np.zeros((3,), np.float32)
  params = taming.convert_taming_state_dict(good, cfg)  # loss.* keys are ignored
  assert params["quantize"]["embedding"].shape == (cfg.n_embed, cfg.embed_dim)

  missing = dict(good)
  del missing["decoder.mid.attn_1.proj_out.bias"]
  with pytest.raises(ValueError, match=r"missing.*decoder\.mid\.attn_1\.proj_out\.bias"):
    taming.convert_taming_state_dict(missing, cfg)

  wrong = dict(good)
  wrong["quantize.embedding.weight"] = np.zeros((cfg.n_embed + 1, cfg.embed_dim), np.float32)
  with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: got \(65, 16\), expected \(64, 16\)"):
    taming.convert_taming_state_dict(wrong, cfg)

  extra = dict(good)
  extra["encoder.down.0.attn.0.q.weight"] = np.zeros((32, 32, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"unexpected.*encoder\.down\.0\.attn\.0\.q\.weight"):
    taming.convert_taming_state_dict(extra, cfg)

  with pytest.raises(ValueError, match="not divisible by num_groups"):
    vqgan.TamingConfig(ch=24, ch_mult=(1, 2))


def test_taming_f16_layout_matches_published_model():
  layout = {k: s for k, (_, s) in taming.taming_param_layout(vqgan.TamingConfig()).items()}
  # Key count and size of the Taming f16 / 1024-code VQModel without its loss modules.
  assert len(layout) == 343
  assert sum(int(np.prod(s)) for s in layout.values()) == 72_141_699
  assert layout["quantize.embedding.weight"] == (1024, 256)
  assert layout["encoder.conv_in.weight"] == (128, 3, 3, 3)
  assert layout["encoder.conv_out.weight"] == (256, 512, 3, 3)
  assert layout["quant_conv.weight"] == (256, 256, 1, 1)
  assert layout["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
  assert layout["encoder.down.3.downsample.conv.weight"] == (256, 256, 3, 3)
  assert layout["encoder.down.4.attn.1.q.weight"] == (512, 512, 1, 1)  # 16 x 16 level
  assert layout["decoder.up.4.attn.2.proj_out.weight"] == (512, 512, 1, 1)
  assert layout["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
  assert layout["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
  assert layout["decoder.conv_out.weight"] == (3, 128, 3, 3)
  assert layout["decoder.norm_out.weight"] == (128,)
  for absent in ("encoder.down.4.downsample.conv.weight", "encoder.down.3.attn.0.q.weight",
                 "decoder.up.0.upsample.conv.weight", "decoder.up.3.attn.0.q.weight"):
    assert absent not in layout


def _random_taming_params(cfg, seed=0):
  """Random converted params with sensible scales, built from the expected torch layout."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, (_, shape) in taming.taming_param_layout(cfg).items():
    if len(shape) == 4:
      std = 1.0 / np.sqrt(np.prod(shape[1:]))
      sd[key] = std * rng.standard_normal(shape)
    elif key.startswith("quantize."):
      sd[key] = rng.standard_normal(shape)
    elif "norm" in key and key.endswith("weight"):
      sd[key] = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      sd[key] = 0.1 * rng.standard_normal(shape)
  return taming.convert_taming_state_dict({k: v.astype(np.float32) for k, v in sd.items()}, cfg)


def test_taming_small_shapes_and_token_clamping():
  cfg = vqgan.TamingConfig.small()
  model = vqgan.TamingVQGAN(cfg)
  variables = {"params": _random_taming_params(cfg)}
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 256), 0, cfg.n_embed)
  with_mask = tokens.at[:, 0].set(cfg.n_embed)  # a mask id is clamped to the last code
  clamped = tokens.at[:, 0].set(cfg.n_embed - 1)
  img = vqgan.decode_tokens(variables, with_mask, config=cfg)
  img_clamped = vqgan.decode_tokens(variables, clamped, config=cfg)
  img_other = vqgan.decode_tokens(variables, tokens.at[:, 0].set(0), config=cfg)
  assert img.shape == (2, 32, 32, 3) and img.dtype == jnp.float32
  assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
  np.testing.assert_array_equal(np.asarray(img), np.asarray(img_clamped))
  if int(tokens[0, 0]) != 0:
    assert not np.array_equal(np.asarray(img), np.asarray(img_other))
  assert float(jnp.std(img)) > 1e-3  # not a constant image
  with pytest.raises(ValueError, match="not a square"):
    jax.eval_shape(lambda v, t: model.apply(v, t, method="decode_tokens"), variables,
                   jnp.zeros((2, 15), jnp.int32))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    jax.eval_shape(lambda v, t: model.apply(v, t, method="encode"), variables,
                   jnp.zeros((2, 3, 32, 32)))
  codes = jax.eval_shape(lambda v, t: model.apply(v, t, method="encode"), variables,
                         jnp.zeros((2, 32, 32, 3)))
  assert codes.shape == (2, 16, 16) and codes.dtype == jnp.int32
  bf16 = jax.eval_shape(lambda v, t: vqgan.decode_tokens(v, t, config=cfg, dtype=jnp.bfloat16),
                        variables, tokens)
  assert bf16.shape == (2, 32, 32, 3) and bf16.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Google MaskGIT VQGAN
# ---------------------------------------------------------------------------------------------

GOOGLE_CFG = vqgan_google.GoogleVQGANConfig.small()  # filters 32, mults (1, 2), 1 block, 16 px


def _gn(c):
  return {"scale": (c,), "bias": (c,)}


def _resblock(cin, cout):
  block = {"GroupNorm_0": _gn(cin), "Conv_0": {"kernel": (3, 3, cin, cout)},
           "GroupNorm_1": _gn(cout), "Conv_1": {"kernel": (3, 3, cout, cout)}}
  if cin != cout:
    block["Conv_2"] = {"kernel": (1, 1, cout, cout)}  # shortcut on the block's output
  return block


def _google_small_shapes():
  """The public code's Linen auto-names and shapes for GOOGLE_CFG, written out by hand."""
  enc = {
      "Conv_0": {"kernel": (3, 3, 3, 32)},
      "ResBlock_0": _resblock(32, 32),  # level 0
      "ResBlock_1": _resblock(32, 64),  # level 1
      "ResBlock_2": _resblock(64, 64),  # extra blocks at the last width
      "GroupNorm_0": _gn(64),
      "Conv_1": {"kernel": (1, 1, 64, 16), "bias": (16,)},
  }
  dec = {
      "Conv_0": {"kernel": (3, 3, 16, 64), "bias": (64,)},
      "ResBlock_0": _resblock(64, 64),
      "ResBlock_1": _resblock(64, 64),  # level 1
      "Conv_1": {"kernel": (3, 3, 64, 64), "bias": (64,)},  # after upsampling
      "ResBlock_2": _resblock(64, 32),  # level 0
      "GroupNorm_0": _gn(32),
      "Conv_2": {"kernel": (3, 3, 32, 3), "bias": (3,)},
  }
  return {"encoder": enc, "decoder": dec, "quantizer": {"codebook": (64, 16)}}


def _random_tree(shapes, seed=0):
  flat = flax.traverse_util.flatten_dict(shapes, is_leaf=lambda _, v: isinstance(v, tuple))
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in flat.items():
    scale = 1.0 if k[-1] in ("codebook",) else 0.2
    base = 1.0 if k[-1] == "scale" else 0.0
    out[k] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


def _write_msgpack(path, tree):
  with open(path, "wb") as f:
    f.write(flax.serialization.to_bytes(tree))
  return str(path)


def test_google_layout_matches_public_names():
  want = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
      _google_small_shapes(), is_leaf=lambda _, v: isinstance(v, tuple)).items()}
  assert vqgan_google.google_param_shapes(GOOGLE_CFG) == want
  full = vqgan_google.google_param_shapes(vqgan_google.GoogleVQGANConfig())
  assert len(full) == 168
  assert sum(int(np.prod(s)) for s in full.values()) == 54_515_587
  assert full["quantizer/codebook"] == (1024, 256)
  assert full["encoder/ResBlock_4/Conv_2/kernel"] == (1, 1, 256, 256)
  assert full["decoder/Conv_0/kernel"] == (3, 3, 256, 512)
  assert full["decoder/ResBlock_4/Conv_2/kernel"] == (1, 1, 256, 256)
  assert full["decoder/Conv_5/kernel"] == (3, 3, 128, 3)
  assert "encoder/ResBlock_1/Conv_2/kernel" not in full


def test_google_msgpack_load_encode_decode(tmp_path):
  params = _random_tree(_google_small_shapes())
  path = _write_msgpack(tmp_path / "tokenizer_checkpoint", {"params": params})
  variables = google_vqgan.load_google_tokenizer(path, GOOGLE_CFG)
  model = vqgan_google.GoogleVQGAN(GOOGLE_CFG)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))

  @jax.jit
  def run(variables, x):
    with jax.default_matmul_precision("highest"):
      rec, codes = model.apply(variables, x)
      z = model.apply(variables, x, method="encode_features")
      img01 = vqgan_google.google_decode_tokens(variables, codes.reshape(2, -1), config=GOOGLE_CFG)
      return rec, codes, z, img01

  img, enc, z, img01 = run(variables, x)
  assert img.shape == (2, 16, 16, 3) and bool(jnp.all(jnp.isfinite(img)))
  assert float(jnp.std(img)) > 1e-3
  np.testing.assert_allclose(np.asarray(img01), np.clip(np.asarray(img), 0, 1), atol=1e-5)
  # Encoding picks the nearest codebook row of the encoder features.
  z = np.asarray(z, np.float64)
  book = np.asarray(params["quantizer"]["codebook"], np.float64)
  dist = ((z[..., None, :] - book) ** 2).sum(-1)
  assert enc.shape == (2, 8, 8) and z.shape == (2, 8, 8, 16)
  np.testing.assert_array_equal(np.asarray(enc), dist.argmin(-1))
  assert len(np.unique(np.asarray(enc))) > 1
  # A bare params tree (without the 'params' wrapper) loads too.
  bare = google_vqgan.load_google_tokenizer(_write_msgpack(tmp_path / "bare", params), GOOGLE_CFG)
  np.testing.assert_array_equal(np.asarray(bare["params"]["quantizer"]["codebook"]),
                                params["quantizer"]["codebook"])


def _np_group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups).astype(np.float64)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def _np_conv3x3(x, k):
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, k.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += xp[:, dy:dy + h, dx:dx + w, :] @ k[dy, dx]
  return out


def _np_swish(x):
  return x / (1 + np.exp(-x))


def test_google_resblock_shortcut_reads_the_block_output():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 6, 6, 32)).astype(np.float32)
  p = _random_tree(_resblock(32, 64), seed=4)
  block = vqgan_google.GoogleResBlock(64)

  @jax.jit
  def apply(p, x):
    with jax.default_matmul_precision("highest"):
      return block.apply({"params": p}, x)

  y = np.asarray(apply(p, x), np.float64)
  # Documented formula: h = conv(swish(gn(conv(swish(gn(x)))))); y = h + conv1x1(h).
  h = _np_conv3x3(_np_swish(_np_group_norm(x, p["GroupNorm_0"]["scale"], p["GroupNorm_0"]["bias"])),
                  p["Conv_0"]["kernel"])
  h = _np_conv3x3(_np_swish(_np_group_norm(h, p["GroupNorm_1"]["scale"], p["GroupNorm_1"]["bias"])),
                  p["Conv_1"]["kernel"])
  expected = h + h @ p["Conv_2"]["kernel"][0, 0]
  assert _rel_err(y, expected) < 1e-5
  # With a zero shortcut kernel the input does not reach the output except through h ...
  p0 = dict(p, Conv_2={"kernel": np.zeros((1, 1, 64, 64), np.float32)})
  y0 = np.asarray(apply(p0, x), np.float64)
  assert _rel_err(y0, h) < 1e-5
  # ... and with an identity kernel the output is exactly 2 h.
  p1 = dict(p, Conv_2={"kernel": np.eye(64, dtype=np.float32)[None, None]})
  y1 = np.asarray(apply(p1, x), np.float64)
  assert _rel_err(y1, 2 * h) < 1e-5
  # Same width: a plain identity skip, y = x + h.
  ps = _random_tree(_resblock(32, 32), seed=5)
  with jax.default_matmul_precision("highest"):
    ys = np.asarray(jax.jit(vqgan_google.GoogleResBlock(32).apply)({"params": ps}, x), np.float64)
  hs = _np_conv3x3(_np_swish(_np_group_norm(x, ps["GroupNorm_0"]["scale"], ps["GroupNorm_0"]["bias"])),
                   ps["Conv_0"]["kernel"])
  hs = _np_conv3x3(_np_swish(_np_group_norm(hs, ps["GroupNorm_1"]["scale"], ps["GroupNorm_1"]["bias"])),
                   ps["Conv_1"]["kernel"])
  assert _rel_err(ys, x + hs) < 1e-5


def test_google_loader_rejects_bad_checkpoints(tmp_path):
  params = _random_tree(_google_small_shapes())
  missing = flax.traverse_util.flatten_dict(params)
  del missing[("decoder", "Conv_0", "bias")]
  path = _write_msgpack(tmp_path / "missing", {"params": flax.traverse_util.unflatten_dict(missing)})
  with pytest.raises(ValueError, match=r"missing.*decoder/Conv_0/bias"):
    google_vqgan.load_google_tokenizer(path, GOOGLE_CFG)

  wrong = _random_tree(_google_small_shapes())
  wrong["quantizer"]["codebook"] = np.zeros((32, 16), np.float32)
  path = _write_msgpack(tmp_path / "wrong", {"params": wrong})
  with pytest.raises(ValueError, match=r"quantizer/codebook: got \(32, 16\), expected \(64, 16\)"):
    google_vqgan.load_google_tokenizer(path, GOOGLE_CFG)

  extra = _random_tree(_google_small_shapes())
  extra["encoder"]["ResBlock_0"]["Conv_2"] = {"kernel": np.zeros((1, 1, 32, 32), np.float32)}
  path = _write_msgpack(tmp_path / "extra", {"params": extra})
  with pytest.raises(ValueError, match=r"unexpected.*encoder/ResBlock_0/Conv_2/kernel"):
    google_vqgan.load_google_tokenizer(path, GOOGLE_CFG)

  # The full-size config rejects the small checkpoint.
  path = _write_msgpack(tmp_path / "small", {"params": params})
  with pytest.raises(ValueError, match="shape mismatch"):
    google_vqgan.load_google_tokenizer(path, vqgan_google.GoogleVQGANConfig())

  junk = tmp_path / "junk"
  junk.write_bytes(b"\x00not msgpack at all")
  with pytest.raises(ValueError, match="junk"):
    google_vqgan.load_google_tokenizer(str(junk), GOOGLE_CFG)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    google_vqgan.load_google_tokenizer(str(tmp_path / "nowhere"), GOOGLE_CFG)
