"""Meissonic transformer, converter and samplers: parity with an independent PyTorch forward in
the released diffusers key layout, hand-computed RoPE and token compression, the sampler's
schedule and guidance, the full-size layout by ``eval_shape``, and the converter's errors."""
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.converters import meissonic as conv
from dimo_jax.converters.safetensors_io import save_safetensors
from dimo_jax.core import samplers as ms
from dimo_jax.networks import conditioning
from dimo_jax.networks import meissonic as net
from dimo_jax.networks import meissonic_blocks as blocks

TINY = net.MeissonicConfig.tiny()   # 2 heads x 16, 2 dual + 2 single blocks, vocab 40, codebook 32
TEXT_LEN = 7


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------ a minimal Meissonic in torch


def _torch_meissonic(cfg: net.MeissonicConfig, seed: int = 0):
  """Meissonic's transformer written for this test from the reference description, with the
  released diffusers state-dict names; channels-first convs and (B, heads, S, D) attention."""
  torch = pytest.importorskip("torch")
  nn, F = torch.nn, torch.nn.functional
  d, hd, heads, f = cfg.width, cfg.head_dim, cfg.num_heads, cfg.mlp_ratio * cfg.width

  class RMSNorm(nn.Module):
    def __init__(self, dim):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
      var = x.float().pow(2).mean(-1, keepdim=True)
      return x * torch.rsqrt(var + 1e-6) * self.weight

  class TwoLayer(nn.Module):
    def __init__(self, n_in, bias=True):
      super().__init__()
      self.linear_1 = nn.Linear(n_in, d, bias=bias)
      self.linear_2 = nn.Linear(d, d, bias=bias)

    def forward(self, x):
      return self.linear_2(F.silu(self.linear_1(x)))

  class Holder(nn.Module):
    def __init__(self, **children):
      super().__init__()
      for k, v in children.items():
        setattr(self, k, v)

  class AdaNorm(nn.Module):
    def __init__(self, chunks):
      super().__init__()
      self.linear = nn.Linear(d, chunks * d)
      self.chunks = chunks

    def forward(self, temb):
      return self.linear(F.silu(temb)).chunk(self.chunks, dim=1)

  class Proj(nn.Module):
    def __init__(self):
      super().__init__()
      self.proj = nn.Linear(d, f)

    def forward(self, x):
      return F.gelu(self.proj(x), approximate="tanh")

  class FF(nn.Module):
    def __init__(self):
      super().__init__()
      self.net = nn.ModuleList([Proj(), nn.Dropout(0.0), nn.Linear(f, d)])

    def forward(self, x):
      for layer in self.net:
        x = layer(x)
      return x

  def rope(x, cos, sin):
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-im, re], -1).flatten(3)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)

  class Attn(nn.Module):
    def __init__(self, joint):
      super().__init__()
      self.joint = joint
      self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
      self.norm_q, self.norm_k = RMSNorm(hd), RMSNorm(hd)
      if joint:
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(d, d), nn.Linear(d, d),
                                                             nn.Linear(d, d))
        self.norm_added_q, self.norm_added_k = RMSNorm(hd), RMSNorm(hd)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(d, d)

    def forward(self, x, c, cos, sin):
      split = lambda t: t.view(t.shape[0], -1, heads, hd).transpose(1, 2)
      q, k, v = self.norm_q(split(self.to_q(x))), self.norm_k(split(self.to_k(x))), split(self.to_v(x))
      if self.joint:
        q = torch.cat([self.norm_added_q(split(self.add_q_proj(c))), q], 2)
        k = torch.cat([self.norm_added_k(split(self.add_k_proj(c))), k], 2)
        v = torch.cat([split(self.add_v_proj(c)), v], 2)
      q, k = rope(q, cos, sin), rope(k, cos, sin)
      out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], -1, d)
      if not self.joint:
        return out
      t = c.shape[1]
      return self.to_out[0](out[:, t:]), self.to_add_out(out[:, :t])

  ln = lambda x: F.layer_norm(x, (d,), eps=1e-6)
  mod = lambda x, shift, scale: ln(x) * (1 + scale[:, None]) + shift[:, None]

  class Dual(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm1_context = AdaNorm(6), AdaNorm(6)
      self.attn = Attn(True)
      self.ff, self.ff_context = FF(), FF()

    def forward(self, x, c, temb, cos, sin):
      sx, scx, gx, sx2, scx2, gx2 = self.norm1(temb)
      sc, scc, gc, sc2, scc2, gc2 = self.norm1_context(temb)
      xa, ca = self.attn(mod(x, sx, scx), mod(c, sc, scc), cos, sin)
      x = x + gx[:, None] * xa
      x = x + gx2[:, None] * self.ff(mod(x, sx2, scx2))
      c = c + gc[:, None] * ca
      c = c + gc2[:, None] * self.ff_context(mod(c, sc2, scc2))
      return c, x

  class Single(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm = AdaNorm(3)
      self.proj_mlp = nn.Linear(d, f)
      self.attn = Attn(False)
      self.proj_out = nn.Linear(d + f, d)

    def forward(self, h, temb, cos, sin):
      shift, scale, gate = self.norm(temb)
      n = mod(h, shift, scale)
      cat = torch.cat([self.attn(n, None, cos, sin), F.gelu(self.proj_mlp(n), approximate="tanh")], -1)
      return h + gate[:, None] * self.proj_out(cat)

  def sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)

  class Meissonic(nn.Module):
    def __init__(self):
      super().__init__()
      self.time_text_embed = Holder(timestep_embedder=TwoLayer(256), text_embedder=TwoLayer(cfg.pooled_dim))
      self.context_embedder = nn.Linear(cfg.text_dim, d)
      self.transformer_blocks = nn.ModuleList([Dual() for _ in range(cfg.num_layers)])
      self.single_transformer_blocks = nn.ModuleList([Single() for _ in range(cfg.num_single_layers)])
      self.embed = Holder(embeddings=nn.Embedding(cfg.vocab_size, d), layer_norm=RMSNorm(d),
                          conv=nn.Conv2d(d, d, 1, bias=False))
      self.mlm_layer = Holder(conv1=nn.Conv2d(d, d, 1, bias=False), layer_norm=RMSNorm(d),
                              conv2=nn.Conv2d(d, cfg.codebook_size, 1, bias=False))
      self.cond_embed = TwoLayer(cfg.pooled_dim + 5 * 256, bias=False)
      self.encoder_proj_layer_norm = RMSNorm(d)
      self.project_to_hidden_norm = RMSNorm(d)
      self.project_to_hidden = nn.Linear(d, d, bias=False)
      self.project_from_hidden_norm = RMSNorm(d)
      self.project_from_hidden = nn.Linear(d, d, bias=False)
      self.down_block = Holder(downsample=Holder(norm=RMSNorm(d), conv=nn.Conv2d(d, d, 2, 2, bias=False)))
      self.up_block = Holder(upsample=Holder(norm=RMSNorm(d),
                                             conv=nn.ConvTranspose2d(d, d, 2, 2, bias=False)))

    def forward(self, tokens, text, pooled, micro, timestep):
      b, hh, ww = tokens.shape
      t = text.shape[1]
      pooled = self.cond_embed(torch.cat([pooled, sinusoid(micro.flatten(), 256).reshape(b, -1)], 1))
      temb = (self.time_text_embed.timestep_embedder(sinusoid(timestep * 1000, 256))
              + self.time_text_embed.text_embedder(pooled))
      e = self.embed.layer_norm(self.embed.embeddings(tokens)).permute(0, 3, 1, 2)
      x = self.embed.conv(e)                                                   # (B, D, H, W)
      c = self.encoder_proj_layer_norm(self.context_embedder(text))
      down = self.down_block.downsample
      x = down.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
      x = down.conv(F.pad(x, (0, 1, 0, 1)))                                     # (B, D, h, w)
      gh, gw = x.shape[2:]
      x = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(b, gh * gw, d)))
      ids = torch.zeros(t + gh * gw, 3, dtype=torch.float64)
      ids[t:, 1] = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
      ids[t:, 2] = torch.arange(gw, dtype=torch.float64).repeat(gh)
      cos, sin = [], []
      for axis, dim in enumerate(cfg.axes_dims_rope):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        ang = torch.outer(ids[:, axis], freqs)
        cos.append(ang.cos().repeat_interleave(2, dim=1).float())
        sin.append(ang.sin().repeat_interleave(2, dim=1).float())
      cos, sin = torch.cat(cos, -1), torch.cat(sin, -1)
      for blk in self.transformer_blocks:
        c, x = blk(x, c, temb, cos, sin)
      h = torch.cat([c, x], 1)
      for blk in self.single_transformer_blocks:
        h = blk(h, temb, cos, sin)
      x = self.project_from_hidden(self.project_from_hidden_norm(h[:, t:]))
      x = x.reshape(b, gh, gw, d).permute(0, 3, 1, 2)
      up = self.up_block.upsample
      x = up.conv(up.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))          # (B, D, H, W)
      x = self.mlm_layer.conv1(x)
      x = self.mlm_layer.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
      logits = self.mlm_layer.conv2(x)                                           # (B, K, H, W)
      return logits.reshape(b, cfg.codebook_size, hh * ww).permute(0, 2, 1)

  torch.manual_seed(seed)
  model = Meissonic().float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name:
        p.uniform_(0.5, 1.5)            # RMSNorm scales away from 1, so a missed scale shows
  return torch, model


def _diffusers_config(cfg: net.MeissonicConfig) -> dict:
  return {"_class_name": "Transformer2DModel", "_diffusers_version": "0.30.2", "patch_size": 1,
          "in_channels": 64, "num_layers": cfg.num_layers, "num_single_layers": cfg.num_single_layers,
          "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
          "joint_attention_dim": cfg.text_dim, "pooled_projection_dim": cfg.pooled_dim,
          "guidance_embeds": False, "axes_dims_rope": list(cfg.axes_dims_rope),
          "vocab_size": cfg.vocab_size, "codebook_size": cfg.codebook_size,
          "downsample": True, "upsample": True}


def _inputs(cfg: net.MeissonicConfig, batch: int = 2, seed: int = 1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.codebook_size, (batch, cfg.seq_len))
  tokens[rng.random((batch, cfg.seq_len)) < 0.4] = cfg.mask_id
  cond = {"text": rng.normal(size=(batch, TEXT_LEN, cfg.text_dim)).astype(np.float32),
          "pooled": rng.normal(size=(batch, cfg.pooled_dim)).astype(np.float32),
          "micro": np.array([[1024, 1024, 0, 0, 6], [512, 768, 3, 5, 5.5]][:batch], np.float32)}
  return tokens.astype(np.int32), cond


@functools.lru_cache(maxsize=None)
def _forward(config: net.MeissonicConfig):
  """A jit-compiled forward with a traced noise sigma (one compile per config)."""
  model = net.MeissonicTransformer(config)

  @jax.jit
  def jitted(params, tokens, cond, timestep, sigma, key):
    return model.apply({"params": params}, tokens, cond, timestep=timestep, noise_sigma=sigma,
                       rngs={"noise": key})

  def forward(params, tokens, cond, timestep=0.0, sigma=0.0, key=None):
    key = jax.random.PRNGKey(0) if key is None else key
    with jax.default_matmul_precision("highest"):   # full fp32 dots on any backend
      return jitted(params, tokens, cond, timestep, sigma, key)
  return forward


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A released-layout transformer/ folder of the tiny torch model, converted once."""
  torch, model = _torch_meissonic(TINY)
  root = tmp_path_factory.mktemp("meissonic")
  folder = root / "transformer"
  folder.mkdir()
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  save_safetensors(str(folder / conv.WEIGHTS_FILE), state)
  (folder / "config.json").write_text(json.dumps(_diffusers_config(TINY)))
  out = root / "converted"
  conv.convert_meissonic(str(folder), str(out))
  return dict(torch=torch, model=model, state=state, folder=str(folder), out=str(out))


# ------------------------------------------------------------------ (a) parity with torch


def test_logits_match_torch(released):
  torch, model = released["torch"], released["model"]
  config, params = conv.load_meissonic(released["out"])
  assert config.num_layers == 2 and config.text_dim == TINY.text_dim and config.scan
  tokens, cond = _inputs(TINY)
  timestep = 3.0
  with torch.no_grad():
    want = model(torch.from_numpy(tokens.astype(np.int64)).reshape(2, TINY.grid, TINY.grid),
                 torch.from_numpy(cond["text"]), torch.from_numpy(cond["pooled"]),
                 torch.from_numpy(cond["micro"]), torch.tensor([timestep])).numpy()
  got = _forward(config)(params, tokens, cond, timestep)
  assert got.shape == (2, TINY.seq_len, TINY.codebook_size)
  assert _rel_err(got, want) <= 1e-5


def test_convert_accepts_file_or_root_folder(released, tmp_path):
  _, ref = conv.load_meissonic(released["out"])
  from_file = conv.convert_meissonic(os.path.join(released["folder"], conv.WEIGHTS_FILE),
                                     str(tmp_path / "a"), param_dtype="bfloat16")
  from_root = conv.convert_meissonic(os.path.dirname(released["folder"]), str(tmp_path / "b"))
  assert from_file.num_layers == from_root.num_layers == TINY.num_layers
  config, params = conv.load_meissonic(str(tmp_path / "a"))
  assert config.param_dtype == "bfloat16"
  assert params["mlm_layer"]["conv2"]["kernel"].dtype == jnp.bfloat16
  _, params_b = conv.load_meissonic(str(tmp_path / "b"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_b, ref)
  meta = json.loads((tmp_path / "b" / conv.CONFIG_FILE).read_text())
  assert meta["kind"] == "meissonic" and net.MeissonicConfig.from_dict(meta["config"]) == from_root


# ------------------------------------------------------------------ (d) scan / unrolled / remat


def test_scan_unrolled_and_remat_agree(released):
  tokens, cond = _inputs(TINY)
  config, params = conv.load_meissonic(released["out"])
  ref = _forward(config)(params, tokens, cond)
  config_u, params_u = conv.load_meissonic(released["out"], scan=False)
  assert "transformer_blocks_1" in params_u and "transformer_blocks" not in params_u
  unrolled = _forward(config_u)(params_u, tokens, cond)
  rematted = _forward(dataclasses.replace(config, remat="full"))(params, tokens, cond)
  np.testing.assert_allclose(unrolled, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rematted, ref, rtol=1e-5, atol=1e-5)
  # The converter writes the unrolled layout directly as well.
  direct = conv.convert_meissonic_state_dict(released["state"], net.MeissonicConfig.tiny(scan=False))
  np.testing.assert_array_equal(direct["single_transformer_blocks_1"]["proj_out"]["kernel"],
                                params_u["single_transformer_blocks_1"]["proj_out"]["kernel"])


def test_embedding_noise(released):
  config, params = conv.load_meissonic(released["out"])
  tokens, cond = _inputs(TINY)
  forward = _forward(config)
  clean = forward(params, tokens, cond)
  noisy = forward(params, tokens, cond, 0.0, 0.3, jax.random.PRNGKey(1))
  other = forward(params, tokens, cond, 0.0, 0.3, jax.random.PRNGKey(2))
  assert not np.allclose(noisy, clean, atol=1e-3)
  assert not np.allclose(noisy, other, atol=1e-3)
  np.testing.assert_array_equal(noisy, forward(params, tokens, cond, 0.0, 0.3, jax.random.PRNGKey(1)))


# ------------------------------------------------------------------ (b) RoPE, (c) compression


def test_rope_hand_computed():
  ids = blocks.position_ids(text_len=1, grid_h=2, grid_w=2)
  np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])
  cos, sin = blocks.rope_tables(ids, axes_dims=(2, 2, 4), theta=10000.0)
  x = np.arange(1, 9, dtype=np.float32)   # one head, 8 dims
  xs = np.broadcast_to(x, (1, 5, 1, 8))
  got = np.asarray(blocks.apply_rope(jnp.asarray(xs), cos, sin))[0, :, 0]

  def rotate(v, pairs_angles):
    out = v.copy()
    for k, a in pairs_angles:
      out[2 * k] = v[2 * k] * math.cos(a) - v[2 * k + 1] * math.sin(a)
      out[2 * k + 1] = v[2 * k + 1] * math.cos(a) + v[2 * k] * math.sin(a)
    return out

  # Pairs: 0 (axis 0, always angle 0), 1 (row, freq 1), 2 (col, freq 1), 3 (col, freq 10000^-0.5).
  for s, (row, col) in enumerate([(0, 0), (0, 0), (0, 1), (1, 0), (1, 1)]):
    want = rotate(x, [(0, 0.0), (1, row * 1.0), (2, col * 1.0), (3, col * 0.01)])
    np.testing.assert_allclose(got[s], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[0], x)   # text: identity rotation


def test_token_compression_hand_computed():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 4, 6, 3)).astype(np.float32)
  k = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)
  got = np.asarray(blocks.downsample_2x2(jnp.asarray(x), jnp.asarray(k)))
  want = np.zeros((1, 2, 3, 5), np.float32)
  for i in range(2):
    for j in range(3):
      for a in range(2):
        for c in range(2):
          want[0, i, j] += x[0, 2 * i + a, 2 * j + c] @ k[a, c]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Odd sizes read one zero row / column at the bottom / right, as the upstream padding does.
  odd = np.asarray(blocks.downsample_2x2(jnp.asarray(x[:, :3, :5]), jnp.asarray(k)))
  padded = np.pad(x[:, :3, :5], ((0, 0), (0, 1), (0, 1), (0, 0)))
  np.testing.assert_allclose(odd, np.asarray(blocks.downsample_2x2(jnp.asarray(padded), jnp.asarray(k))))

  y = rng.normal(size=(1, 2, 3, 5)).astype(np.float32)
  ku = rng.normal(size=(2, 2, 5, 3)).astype(np.float32)
  got = np.asarray(blocks.upsample_2x2(jnp.asarray(y), jnp.asarray(ku)))
  want = np.zeros((1, 4, 6, 3), np.float32)
  for i in range(2):
    for j in range(3):
      for a in range(2):
        for c in range(2):
          want[0, 2 * i + a, 2 * j + c] = y[0, i, j] @ ku[a, c]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (e) samplers


def test_schedule_counts():
  np.testing.assert_array_equal(ms.mask_schedule_counts(16, 8), [15, 14, 13, 11, 8, 6, 3, 0])
  np.testing.assert_array_equal(ms.mask_schedule_counts(4, 8), [3, 2, 1, 1, 1, 1, 1, 0])
  counts = ms.mask_schedule_counts(4096, 48)
  want, masked = [], 4096
  for i in range(47):
    masked = max(1, min(masked - 1, math.floor(4096 * math.cos(math.pi / 2 * (i + 1) / 48))))
    want.append(masked)
  # Upstream computes in float32, where cos(pi/3) falls just below 0.5: 2047, not 2048, at i = 31.
  want[31] = 2047
  np.testing.assert_array_equal(counts, want + [0])
  assert counts[0] == 4093
  torch = pytest.importorskip("torch")
  upstream = [int((4096 * torch.cos(((torch.tensor([i]) + 1) / 48) * math.pi / 2)).floor())
              for i in range(48)]
  np.testing.assert_array_equal(ms.cosine_mask_lengths(4096, 48), upstream)


K, L = 8, 16


def _table_apply(params, tokens, cond, timestep, noise_sigma=0.0, rng=None):
  """Logits = cond['text'][:, 0] at every position (ignores the tokens)."""
  del noise_sigma, rng
  row = cond["text"][:, 0, :K] * params["scale"] + 0.0 * timestep
  return jnp.broadcast_to(row[:, None, :], (tokens.shape[0], tokens.shape[1], K))


def _timestep_apply(params, tokens, cond, timestep, noise_sigma=0.0, rng=None):
  """Logits peaked at code ``timestep`` (mod K), so each token records the step that kept it."""
  del params, cond, noise_sigma, rng
  hot = jax.nn.one_hot(jnp.asarray(timestep, jnp.int32) % K, K) * 100.0
  return jnp.broadcast_to(hot, (tokens.shape[0], tokens.shape[1], K))


def _cond(rows):
  rows = np.asarray(rows, np.float32)
  return {"text": rows[:, None, :], "pooled": np.zeros((len(rows), 1), np.float32)}


def test_sampler_schedule_timesteps_and_no_mask_left():
  steps = 6
  cond = _cond(np.zeros((3, K)))
  tokens, trace = ms.gumbel_ramp_sampler(_timestep_apply, None, jax.random.PRNGKey(0), cond,
                                      seq_len=L, mask_id=K, codebook_size=K, steps=steps,
                                      return_trace=True)
  counts = ms.mask_schedule_counts(L, steps)
  np.testing.assert_array_equal(np.asarray(trace), np.repeat(counts[:, None], 3, axis=1))
  tokens = np.asarray(tokens)
  assert tokens.shape == (3, L) and (tokens != K).all() and (tokens < K).all()
  # Tokens kept at step i carry code (steps - 1 - i): the network saw the step index.
  kept = np.concatenate([[L], counts[:-1]]) - counts
  for i in range(steps):
    assert ((tokens == steps - 1 - i).sum(-1) == kept[i]).all()


def test_sampler_guidance_uses_negative_condition():
  rng = np.random.default_rng(0)
  cond, neg = _cond(rng.normal(size=(2, K))), _cond(rng.normal(size=(1, K)))
  neg2 = _cond(np.repeat(neg["text"][:, 0], 2, axis=0))
  params = {"scale": jnp.float32(0.5)}
  run = lambda c, n, **kw: np.asarray(ms.gumbel_ramp_sampler(
      _table_apply, params, jax.random.PRNGKey(3), c, n, seq_len=L, mask_id=K, codebook_size=K,
      steps=4, **kw))
  np.testing.assert_array_equal(run(cond, neg, guidance=0.0), run(neg2, None))
  np.testing.assert_array_equal(run(cond, neg, guidance=1.0), run(cond, None))
  a, b = run(cond, neg), run(cond, neg)
  np.testing.assert_array_equal(a, b)   # deterministic under a fixed key
  assert not np.array_equal(a, run(cond, neg, guidance=0.0))
  # Strong guidance toward code 5 and away from code 3.
  peaked = _cond(np.eye(K)[[5, 5]] * 4.0)
  away = _cond(np.eye(K)[[3]] * 4.0)
  out = run(peaked, away, guidance=9.0)
  assert (out == 5).all()


def test_sampler_per_row_keys_match_a_batch_of_one():
  rng = np.random.default_rng(1)
  cond, neg = _cond(rng.normal(size=(3, K))), _cond(rng.normal(size=(1, K)))
  params = {"scale": jnp.float32(0.5)}
  keys = jnp.stack([jax.random.PRNGKey(s) for s in (7, 8, 9)])
  run = lambda key, c: np.asarray(ms.gumbel_ramp_sampler(
      _table_apply, params, key, c, neg, seq_len=L, mask_id=K, codebook_size=K, steps=5))
  batched = run(keys, cond)
  for b in range(3):
    alone = run(keys[b], jax.tree_util.tree_map(lambda x: x[b:b + 1], cond))
    np.testing.assert_array_equal(batched[b:b + 1], alone)
  assert not np.array_equal(batched[0], batched[1])
  typed = run(jax.random.wrap_key_data(keys), cond)
  np.testing.assert_array_equal(typed, batched)
  with pytest.raises(ValueError, match="one per row"):
    run(keys[:2], cond)


def test_samplers_with_tiny_model(released):
  config, params = conv.load_meissonic(released["out"])
  model = net.MeissonicTransformer(config)
  apply_fn = conditioning.make_apply_fn(model, conditions=True)
  _, cond = _inputs(TINY)
  cond.pop("micro")   # defaults to [1024, 1024, 0, 0, 6]
  neg = jax.tree_util.tree_map(lambda x: x[:1] * 0.5, cond)
  kw = dict(seq_len=TINY.seq_len, mask_id=TINY.mask_id, codebook_size=TINY.codebook_size)
  tokens = ms.gumbel_ramp_sampler(apply_fn, params, jax.random.PRNGKey(1), cond, neg, steps=4, **kw)
  tokens = np.asarray(tokens)
  assert tokens.shape == (2, TINY.seq_len) and (tokens >= 0).all() and (tokens < TINY.codebook_size).all()
  draw = lambda seed: [np.asarray(a) for a in ms.one_step_cond_sampler(
      apply_fn, params, jax.random.PRNGKey(seed), cond, r_init=0.5, noise_sigma=0.3,
      return_init=True, **kw)]
  one, x_init = draw(2)
  assert ((x_init == TINY.mask_id).sum(-1) == TINY.seq_len // 2).all()
  assert (x_init[x_init != TINY.mask_id] < TINY.codebook_size).all()
  assert one.shape == (2, TINY.seq_len) and (one < TINY.codebook_size).all()
  np.testing.assert_array_equal(one, draw(2)[0])
  assert not np.array_equal(x_init, draw(3)[1])


# ------------------------------------------------------------------ (f) full-size layout


def test_full_size_layout():
  full = net.MeissonicConfig()
  assert net.count_params(full) == 1_006_946_304
  layout = conv.transformer_layout(full)
  assert len(layout) == 867
  assert sum(int(np.prod(s)) for s in layout.values()) == 1_006_946_304
  assert conv.flax_layout(full) == net.param_shapes(full)
  assert layout["single_transformer_blocks.27.proj_out.weight"] == (1024, 5120)
  assert layout["up_block.upsample.conv.weight"] == (1024, 1024, 2, 2)
  tiny_unrolled = net.MeissonicConfig.tiny(scan=False)
  assert conv.flax_layout(tiny_unrolled) == net.param_shapes(tiny_unrolled)


# ------------------------------------------------------------------ (g) clear errors


def test_errors_name_the_problem(released, tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m dimo_jax.convert meissonic"):
    conv.load_meissonic(str(tmp_path / "nowhere"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no .safetensors"):
    conv.convert_meissonic(str(empty), str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="not found"):
    conv.convert_meissonic(str(tmp_path / "missing.safetensors"), str(tmp_path / "out"))

  state = dict(released["state"])
  state["transformer_blocks.1.attn.to_q.weight"] = np.zeros((3, 3), np.float32)
  state["extra.weight"] = np.zeros((2,), np.float32)
  del state["mlm_layer.conv2.weight"]
  with pytest.raises(ValueError) as err:
    conv.convert_meissonic_state_dict(state, TINY, source="my.safetensors")
  msg = str(err.value)
  assert "my.safetensors" in msg
  assert "wrong shape: transformer_blocks.1.attn.to_q.weight: got (3, 3), expected (32, 32)" in msg
  assert "unexpected keys (1): extra.weight" in msg
  assert "missing keys (1): mlm_layer.conv2.weight" in msg
  assert "python -m dimo_jax.convert meissonic" in msg

  # A config.json that does not match the weights: every block of the missing layers is named.
  folder = tmp_path / "mismatch"
  folder.mkdir()
  save_safetensors(str(folder / conv.WEIGHTS_FILE), released["state"])
  (folder / "config.json").write_text(json.dumps({**_diffusers_config(TINY), "num_layers": 3}))
  with pytest.raises(ValueError, match=r"missing keys \(32\): transformer_blocks\.2\."):
    conv.convert_meissonic(str(folder), str(tmp_path / "out2"))
  with pytest.raises(ValueError, match="pooled_dim"):
    net.MeissonicConfig.tiny(pooled_dim=16)
