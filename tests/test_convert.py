"""Converters: parity with independent reference forwards, strict key/shape checks, CLI, configs."""
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import serialization

from dimo_jax import convert
from dimo_jax.converters import commands, google_maskgit, maskgit_common, torch_files, valeoai
from dimo_jax.core import trees
from dimo_jax.networks import maskgit
from dimo_jax.storage import checkpoints, loaders

jax.config.update("jax_default_matmul_precision", "highest")

K, C, L, W, H, DEPTH, MLP = 16, 10, 16, 64, 4, 2, 128


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------ a minimal valeoai MaskGIT in torch


def _torch_maskgit(seed=0):
  """valeoai MaskGIT layout with the published state-dict names (written for the test)."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class PreNorm(nn.Module):

    def __init__(self, fn):
      super().__init__()
      self.norm = nn.LayerNorm(W)
      self.fn = fn

    def forward(self, x):
      return self.fn(self.norm(x))

  class Attention(nn.Module):

    def __init__(self):
      super().__init__()
      self.mha = nn.MultiheadAttention(W, H, batch_first=True, bias=True)

    def forward(self, x):
      return self.mha(x, x, x, need_weights=False)[0]

  class FeedForward(nn.Module):

    def __init__(self):
      super().__init__()
      self.net = nn.Sequential(nn.Linear(W, MLP), nn.GELU(), nn.Dropout(0.1), nn.Linear(MLP, W), nn.Dropout(0.1))

    def forward(self, x):
      return self.net(x)

  class Encoder(nn.Module):

    def __init__(self):
      super().__init__()
      self.layers = nn.ModuleList([nn.ModuleList([PreNorm(Attention()), PreNorm(FeedForward())])
                                   for _ in range(DEPTH)])

    def forward(self, x):
      for attn, ff in self.layers:
        x = x + attn(x)
        x = x + ff(x)
      return x

  class MaskGIT(nn.Module):

    def __init__(self):
      super().__init__()
      rows = K + 1 + C + 1
      self.tok_emb = nn.Embedding(rows, W)
      self.pos_emb = nn.Parameter(torch.zeros(1, L + 1, W))
      self.first_layer = nn.Sequential(
          nn.LayerNorm(W, eps=1e-12), nn.Dropout(0.1), nn.Linear(W, W), nn.GELU(),
          nn.LayerNorm(W, eps=1e-12), nn.Dropout(0.1), nn.Linear(W, W))
      self.transformer = Encoder()
      self.last_layer = nn.Sequential(
          nn.LayerNorm(W, eps=1e-12), nn.Dropout(0.1), nn.Linear(W, W), nn.GELU(), nn.LayerNorm(W, eps=1e-12))
      self.bias = nn.Parameter(torch.zeros(L + 1, rows))

    def forward(self, tokens, labels):
      cls = torch.where(labels >= C, K + 1 + C, labels + K + 1)
      x = self.tok_emb(torch.cat([tokens, cls[:, None]], 1)) + self.pos_emb
      x = self.last_layer(self.transformer(self.first_layer(x)))
      logits = x @ self.tok_emb.weight.T + self.bias
      return logits[:, :L, :K + 1]

  torch.manual_seed(seed)
  model = MaskGIT()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or name.split(".")[1] in ("0", "4")) and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))  # LayerNorm scales
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def _inputs(seed=1, batch=4):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, K, (batch, L)).astype(np.int32)
  tokens[rng.random((batch, L)) < 0.4] = K  # mask tokens
  labels = np.array([3, C, 0, C - 1][:batch], np.int32)  # includes the null class
  return tokens, labels


def test_valeoai_parity_with_torch():
  torch = pytest.importorskip("torch")
  tm = _torch_maskgit()
  tokens, labels = _inputs()
  with torch.no_grad():
    ref = tm(torch.from_numpy(tokens).long(), torch.from_numpy(labels).long()).numpy()
  params, kw = valeoai.convert_valeoai_state_dict(tm.state_dict(), {"heads": H, "codebook_size": K})
  assert kw == dict(codebook_size=K, seq_len=L, num_classes=C, width=W, depth=DEPTH, heads=H, mlp_dim=MLP,
                    class_token="last", ln_eps=1e-5, ln_eps_io=1e-12, gelu_approximate=False)
  assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (DEPTH, W, 3 * W)
  model = maskgit.MaskTransformer(**kw)
  out = model.apply({"params": jax.tree_util.tree_map(jnp.asarray, params)}, tokens, labels)
  assert out.shape == (4, L, K + 1) and out.dtype == jnp.float32
  assert _rel_err(out, ref) < 1e-5
  # The same weights in the unrolled layout give the same parameters.
  unrolled, _ = valeoai.convert_valeoai_state_dict(tm.state_dict(), {"heads": H, "codebook_size": K, "scan": False})
  restacked = maskgit.stack_layers(unrolled, DEPTH)
  for a, b in zip(jax.tree_util.tree_leaves(restacked), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  # A wrong head count changes the output: the comparison can fail.
  bad = maskgit.MaskTransformer(**{**kw, "heads": 2}).apply({"params": params}, tokens, labels)
  assert _rel_err(bad, ref) > 1e-3


def _random_state_dict(seed=0):
  """A valeoai-layout state dict of NumPy arrays (no torch needed)."""
  rng = np.random.default_rng(seed)
  layout = valeoai.valeoai_layout(depth=DEPTH, width=W, mlp_dim=MLP, rows=K + C + 2, positions=L + 1)
  return {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in layout.items()}


def test_valeoai_wrappers_and_prefixes():
  sd = _random_state_dict()
  ref, _ = valeoai.convert_valeoai_state_dict(sd, {"heads": H, "num_classes": C})
  wrapped = {"iter": 7, "model_state_dict": {"module." + k: v for k, v in sd.items()},
             "optimizer_state_dict": {"state": {}}}
  got, kw = valeoai.convert_valeoai_state_dict(wrapped, {"heads": H, "num_classes": C})
  assert kw["codebook_size"] == K
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"Top-level keys: \[epoch, weights\]"):
    valeoai.convert_valeoai_state_dict({"epoch": 1, "weights": [1, 2]}, {"heads": H})


def test_valeoai_published_sizes():
  """The published table (2026 rows, width 768) fixes codes, classes and 16 heads by default."""
  rng = np.random.default_rng(0)
  layout = valeoai.valeoai_layout(depth=1, width=768, mlp_dim=3072, rows=2026, positions=257)
  sd = {k: np.full(s, 0.5, np.float32) if len(s) == 1 else rng.normal(size=s).astype(np.float32)
        for k, s in layout.items()}
  params, kw = valeoai.convert_valeoai_state_dict(sd)
  assert (kw["codebook_size"], kw["num_classes"], kw["seq_len"], kw["heads"], kw["mlp_dim"]) == (1024, 1000, 256, 16, 3072)
  np.testing.assert_array_equal(params["blocks"]["attn"]["qkv"]["kernel"][0],
                                sd["transformer.layers.0.0.fn.mha.in_proj_weight"].T)
  np.testing.assert_array_equal(params["out_bias"], sd["bias"])


def test_valeoai_bad_inputs():
  sd = _random_state_dict()
  ok = {"heads": H, "codebook_size": K}
  missing = dict(sd)
  del missing["transformer.layers.1.0.fn.mha.in_proj_bias"]
  with pytest.raises(ValueError, match=r"missing keys \(1\): transformer\.layers\.1\.0\.fn\.mha\.in_proj_bias"):
    valeoai.convert_valeoai_state_dict(missing, ok)
  extra = dict(sd, **{"transformer.layers.0.1.fn.net.9.weight": np.zeros((3,), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): transformer\.layers\.0\.1\.fn\.net\.9\.weight"):
    valeoai.convert_valeoai_state_dict(extra, ok)
  wrong = dict(sd, **{"last_layer.2.weight": np.zeros((W, W + 1), np.float32)})
  with pytest.raises(ValueError, match=r"wrong shape: last_layer\.2\.weight: got \(64, 65\), expected \(64, 64\)"):
    valeoai.convert_valeoai_state_dict(wrong, ok)
  # All problems at once, each named.
  both = dict(missing, **{"foo": np.zeros(1)})
  with pytest.raises(ValueError) as e:
    valeoai.convert_valeoai_state_dict(both, ok)
  assert "in_proj_bias" in str(e.value) and "foo" in str(e.value)
  with pytest.raises(ValueError, match="heads"):
    valeoai.convert_valeoai_state_dict(sd, {"codebook_size": K})  # width 64: heads must be given
  with pytest.raises(ValueError, match="codebook_size or num_classes"):
    valeoai.convert_valeoai_state_dict(sd, {"heads": H})  # not the published 2026 rows
  with pytest.raises(ValueError, match="heads=5 does not divide"):
    valeoai.convert_valeoai_state_dict(sd, {"heads": 5, "codebook_size": K})
  with pytest.raises(ValueError, match="disagree"):
    valeoai.convert_valeoai_state_dict(sd, {"heads": H, "codebook_size": K, "width": 128})
  with pytest.raises(ValueError, match="unknown model fields"):
    valeoai.convert_valeoai_state_dict(sd, {"heads": H, "codebook_size": K, "colour": 1})


# ------------------------------------------------------------------------------- Google MaskGIT

GH = 4  # heads


def _google_tree(seed=0, depth=DEPTH):
  """Synthetic Google MaskGIT checkpoint with the Linen auto-names of the public code."""
  rng = np.random.default_rng(seed)
  rows, d = K + C + 1, W // GH
  n = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)
  ln = lambda: {"scale": (1.0 + 0.2 * rng.normal(size=W)).astype(np.float32), "bias": n(W)}
  dense = lambda i, o: {"kernel": n(i, o), "bias": n(o)}
  p = {"Embed_0": {"word_embeddings": {"embedding": n(rows, W)},
                   "position_embeddings": {"embedding": n(L + 1, W)}, "embeddings_ln": ln()}}
  for i in range(depth):
    sa = {name: {"kernel": n(W, GH, d), "bias": n(GH, d)} for name in ("query", "key", "value")}
    sa["out"] = {"kernel": n(GH, d, W), "bias": n(W)}
    p[f"TransformerLayer_{i}"] = {
        "Attention_0": {"self_attention": sa, "attention_output_ln": ln()},
        "Mlp_0": {"intermediate_output": dense(W, MLP), "layer_output": dense(MLP, W), "layer_output_ln": ln()}}
  p["MlmLayer_0"] = {"mlm_dense": dense(W, W), "mlm_ln": ln(), "mlm_bias": {"bias": n(rows)}}
  return {"params": p}


def _np_ln(x, p, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_google_forward(tree, ids):
  """Independent NumPy forward of Google's BERT on Google input ids [B, L+1] -> [B, L+1, rows]."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree["params"])
  e = p["Embed_0"]
  x = e["word_embeddings"]["embedding"][ids] + e["position_embeddings"]["embedding"][None, : ids.shape[1]]
  x = _np_ln(x, e["embeddings_ln"])
  d = W // GH
  for i in range(DEPTH):
    a, m = p[f"TransformerLayer_{i}"]["Attention_0"], p[f"TransformerLayer_{i}"]["Mlp_0"]
    sa = a["self_attention"]
    q, k, v = (np.einsum("btw,whd->bthd", x, sa[n]["kernel"]) + sa[n]["bias"] for n in ("query", "key", "value"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", s, v)
    o = np.einsum("bqhd,hdw->bqw", o, sa["out"]["kernel"]) + sa["out"]["bias"]
    x = _np_ln(x + o, a["attention_output_ln"])
    h = _np_gelu_tanh(x @ m["intermediate_output"]["kernel"] + m["intermediate_output"]["bias"])
    h = h @ m["layer_output"]["kernel"] + m["layer_output"]["bias"]
    x = _np_ln(x + h, m["layer_output_ln"])
  ml = p["MlmLayer_0"]
  h = _np_ln(_np_gelu_tanh(x @ ml["mlm_dense"]["kernel"] + ml["mlm_dense"]["bias"]), ml["mlm_ln"])
  return h @ e["word_embeddings"]["embedding"].T + ml["mlm_bias"]["bias"]


def test_google_maskgit_parity_with_numpy(tmp_path):
  tree = _google_tree()
  data = serialization.msgpack_serialize(tree)
  path = tmp_path / "maskgit_checkpoint"
  path.write_bytes(data)
  params, kw = google_maskgit.convert_google_maskgit(str(path), {"codebook_size": K})
  assert kw == dict(codebook_size=K, seq_len=L, num_classes=C, width=W, depth=DEPTH, heads=GH, mlp_dim=MLP,
                    ln_eps=1e-12, gelu_approximate=True)
  from_bytes, _ = google_maskgit.convert_google_maskgit(data, {"num_classes": C})
  for a, b in zip(jax.tree_util.tree_leaves(from_bytes), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)

  tokens, _ = _inputs()
  labels = np.array([3, 9, 0, 5], np.int32)
  model = maskgit.BertMaskTransformer(**kw)
  out = np.asarray(model.apply({"params": params}, tokens, labels))
  ids = np.concatenate([(K + labels)[:, None], np.where(tokens == K, K + C, tokens)], axis=1)
  ref = _np_google_forward(tree, ids)[:, 1:]
  ref = np.concatenate([ref[..., :K], ref[..., K + C:K + C + 1]], axis=-1)
  assert out.shape == (4, L, K + 1)
  assert _rel_err(out, ref) < 1e-5


def test_google_maskgit_bad_inputs():
  tree = _google_tree()
  p = tree["params"]
  del p["TransformerLayer_1"]["Mlp_0"]["layer_output_ln"]["bias"]
  p["MlmLayer_0"]["extra_dense"] = {"kernel": np.zeros((2, 2), np.float32)}
  p["TransformerLayer_0"]["Attention_0"]["self_attention"]["key"]["kernel"] = np.zeros((W, GH, 8), np.float32)
  with pytest.raises(ValueError) as e:
    google_maskgit.convert_google_maskgit(serialization.msgpack_serialize(tree), {"codebook_size": K})
  msg = str(e.value)
  assert "missing keys (1): TransformerLayer_1/Mlp_0/layer_output_ln/bias" in msg
  assert "unexpected keys (1): MlmLayer_0/extra_dense/kernel" in msg
  assert ("wrong shape: TransformerLayer_0/Attention_0/self_attention/key/kernel: "
          "got (64, 4, 8), expected (64, 4, 16)") in msg
  with pytest.raises(ValueError, match=r"top-level keys \['encoder', 'quantizer'\]"):
    google_maskgit.convert_google_maskgit(serialization.msgpack_serialize({"encoder": {"a": np.zeros(1)},
                                                                    "quantizer": {"b": np.zeros(1)}}))
  with pytest.raises(ValueError, match="not a flax msgpack"):
    google_maskgit.convert_google_maskgit(b"\x00\x01not msgpack at all")
  with pytest.raises(FileNotFoundError, match="nowhere.msgpack"):
    google_maskgit.convert_google_maskgit("/nonexistent/nowhere.msgpack")


# --------------------------------------------------------------------- files, CLI and checkpoints


def test_cli_valeoai_and_generator_roundtrip(tmp_path):
  torch = pytest.importorskip("torch")
  tm = _torch_maskgit(seed=3)
  sd = tm.state_dict()
  src = tmp_path / "MaskGIT.pth"
  torch.save({"iter": 1, "model_state_dict": {"module." + k: v for k, v in sd.items()}}, str(src))
  out = tmp_path / "teacher"
  assert convert.main(["valeoai", f"--input={src}", f"--output={out}", f"--heads={H}",
                       f"--codebook_size={K}"]) == 0
  params, ema, cfg = checkpoints.load_params(str(out))
  ref, kw = valeoai.convert_valeoai_state_dict(sd, {"heads": H, "codebook_size": K})
  for a, b, c in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ema),
                     jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
  assert cfg["model"] == {"arch": "preln", "width": W, "depth": DEPTH, "heads": H, "mlp_dim": MLP,
                          "class_token": "last", "ln_eps": 1e-5, "ln_eps_io": 1e-12, "gelu_approximate": False}
  assert cfg["dataset"] == {"vocab_size": K, "num_classes": C, "seq_len": L, "image_shape": [4, 4]}
  model = maskgit.build_model(ml_collections.ConfigDict(cfg["model"]), codebook_size=K, seq_len=L, num_classes=C)
  tokens, labels = _inputs()
  with torch.no_grad():
    want = tm(torch.from_numpy(tokens).long(), torch.from_numpy(labels).long()).numpy()
  assert _rel_err(model.apply({"params": params}, tokens, labels), want) < 1e-5

  with pytest.raises(FileExistsError, match="--overwrite"):
    convert.main(["valeoai", f"--input={src}", f"--output={out}", f"--heads={H}", f"--codebook_size={K}"])
  convert.main(["valeoai", f"--input={src}", f"--output={out}", f"--heads={H}", f"--codebook_size={K}",
                "--overwrite"])

  gen = tmp_path / "generator"
  torch.save(sd, str(tmp_path / "pytorch_model.bin"))
  convert.main(["dimo-generator", f"--input={tmp_path / 'pytorch_model.bin'}", f"--output={gen}",
                f"--heads={H}", f"--num_classes={C}"])
  gparams, _, gcfg = checkpoints.load_params(str(gen))
  assert gcfg["role"] == "generator" and gcfg["sample"]["steps"] == 1 and gcfg["converted"]["kind"] == "dimo-generator"
  np.testing.assert_array_equal(gparams["tok_emb"]["embedding"], ref["tok_emb"]["embedding"])


def test_torch_load_refuses_code(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pth"
  torch.save({"model_state_dict": {"tok_emb.weight": torch.zeros(2, 2)}, "obj": _Opaque()}, str(path))
  with pytest.raises(ValueError, match="weights_only=True"):
    torch_files.load_torch_file(str(path))
  with pytest.raises(FileNotFoundError, match="missing.pth"):
    torch_files.load_torch_file(str(tmp_path / "missing.pth"))


class _Opaque:
  pass


def test_cli_google_maskgit(tmp_path):
  src = tmp_path / "maskgit_imagenet_checkpoint"
  src.write_bytes(serialization.msgpack_serialize(_google_tree(seed=5)))
  out = tmp_path / "google"
  convert.main(["google-maskgit", f"--input={src}", f"--output={out}", f"--codebook_size={K}"])
  params, _, cfg = checkpoints.load_params(str(out))
  assert cfg["model"]["arch"] == "bert" and cfg["model"]["heads"] == GH
  assert cfg["dataset"]["vocab_size"] == K and cfg["dataset"]["num_classes"] == C
  ref, _ = google_maskgit.convert_google_maskgit(str(src), {"codebook_size": K})
  np.testing.assert_array_equal(params["blocks"]["attn"]["qkv"]["kernel"], ref["blocks"]["attn"]["qkv"]["kernel"])


def test_cli_vqgans(tmp_path):
  torch = pytest.importorskip("torch")
  from dimo_jax.converters import taming
  from dimo_jax.networks import vqgan, vqgan_google
  rng = np.random.default_rng(0)
  small = vqgan.TamingConfig.small()
  sd = {k: torch.from_numpy(rng.normal(0, 0.1, s).astype(np.float32))
        for k, (_, s) in taming.taming_param_layout(small).items()}
  src = tmp_path / "last.ckpt"
  torch.save({"state_dict": sd}, str(src))
  fields = {f: getattr(small, f) for f in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                                           "z_channels", "embed_dim", "n_embed")}
  out = tmp_path / "vq_taming"
  convert.main(["taming-vqgan", f"--input={src}", f"--output={out}", f"--vqgan_config={json.dumps(fields)}"])
  module, variables = loaders.load_vqgan(str(out))
  want = taming.load_taming_checkpoint(str(src), small)
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  side = small.latent_size
  images = module.apply(variables, jnp.zeros((1, side * side), jnp.int32), method="decode_tokens")
  assert images.shape == (1, small.resolution, small.resolution, 3)

  gsmall = vqgan_google.GoogleVQGANConfig.small()
  flat = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in vqgan_google.google_param_shapes(gsmall).items()}
  tree = {"params": trees.unflatten(flat)}
  gsrc = tmp_path / "tokenizer_checkpoint"
  gsrc.write_bytes(serialization.msgpack_serialize(tree))
  gout = tmp_path / "vq_google"
  gfields = {"filters": 32, "channel_multipliers": [1, 2], "num_res_blocks": 1, "embedding_dim": 16,
             "codebook_size": 64, "image_size": 16}
  convert.main(["google-vqgan", f"--input={gsrc}", f"--output={gout}", f"--vqgan_config={json.dumps(gfields)}"])
  gmodule, gvars = loaders.load_vqgan(str(gout))
  assert isinstance(gmodule, vqgan_google.GoogleVQGAN) and gmodule.config == gsmall
  for key, value in flat.items():
    node = gvars["params"]
    for part in key.split("/"):
      node = node[part]
    np.testing.assert_array_equal(node, value)
  with pytest.raises(ValueError, match="unknown GoogleVQGANConfig fields"):
    convert.main(["google-vqgan", f"--input={gsrc}", f"--output={gout}", '--vqgan_config={"ch": 3}'])


# -------------------------------------------------------------------------------- configs, paths


def test_maskgit_configs_defaults():
  from configs import maskgit as maskgit_config, maskgit_google
  c = maskgit_config.get_config("2")
  assert (c.distill.r_init, c.distill.sigma, c.distill.mask_schedule, c.distill.divergence) == (
      "fix_0.6", 0.1, "arccos", "fkl")
  assert (c.teacher.guidance, c.distill.gen_lr, c.distill.aux_lr, c.distill.eps) == (2.0, 1e-5, 1e-5, 1e-6)
  assert (c.distill.warmup_steps, c.distill.gen_grad_clip, c.distill.ema_decay, c.seed) == (100, 1.0, 0.9999, 3407)
  assert tuple(c.distill.freeze) == ("tok_emb", "pos_emb", "out_bias") and c.distill.teacher_dropout
  assert c.distill.batch_size == 128  # 64 per device on the two devices of the test
  assert (c.model.width, c.model.depth, c.model.heads, c.model.mlp_dim, c.model.dtype) == (768, 24, 16, 3072, "bfloat16")
  assert (c.data.vocab_size, c.data.num_classes, c.data.seq_len) == (1024, 1000, 256)
  assert (c.sample.steps, c.sample.guidance, c.sample.guidance_schedule, c.sample.temperature, c.sample.r_temp) == (
      16, 2.5, "linear", 1.3, 4.5)
  assert c.vqgan.kind == "taming"
  c.model.width = 64
  assert c.model.mlp_dim == 256  # follows the width
  g = maskgit_google.get_config("1")
  assert (g.model.arch, g.model.class_token, g.teacher.guidance, g.sample.schedule, g.vqgan.kind) == (
      "bert", "first", 1.0, "cosine", "google")
  model = maskgit.build_model(g.model, codebook_size=g.data.vocab_size, seq_len=g.data.seq_len,
                             num_classes=g.data.num_classes)
  assert model.num_rows == 2025


def test_check_paths(tmp_path):
  from configs import maskgit as maskgit_config, maskgit_google
  c = maskgit_config.get_config("1")
  c.teacher.checkpoint = str(tmp_path / "teacher")
  c.vqgan.checkpoint = str(tmp_path / "vq")
  with pytest.raises(FileNotFoundError) as e:
    commands.check_paths(c)
  assert str(tmp_path / "teacher") in str(e.value)
  assert (f"python -m dimo_jax.convert valeoai --input=MaskGIT_ImageNet_256.pth "
          f"--output={tmp_path / 'teacher'} --heads=16") in str(e.value)
  # A converted teacher satisfies the teacher check; the VQGAN is next.
  sd = _random_state_dict()
  params, kw = valeoai.convert_valeoai_state_dict(sd, {"heads": H, "codebook_size": K})
  maskgit_common.save_converted(str(tmp_path / "teacher"), params, kw, arch="preln", kind="valeoai")
  commands.check_paths(c, which=("teacher",))
  with pytest.raises(FileNotFoundError) as e:
    commands.check_paths(c)
  assert f"python -m dimo_jax.convert taming-vqgan --input=VQGAN/last.ckpt --output={tmp_path / 'vq'}" in str(e.value)
  c.vqgan.checkpoint = ""
  commands.check_paths(c)  # no VQGAN configured: nothing to check

  g = maskgit_google.get_config("1")
  g.teacher.checkpoint = str(tmp_path / "gt")
  with pytest.raises(FileNotFoundError, match="python -m dimo_jax.convert google-maskgit "
                     "--input=maskgit_imagenet256_checkpoint"):
    commands.check_paths(g)
  g.teacher.checkpoint = str(tmp_path / "teacher")
  with pytest.raises(FileNotFoundError, match="python -m dimo_jax.convert google-vqgan"):
    commands.check_paths(g)


def test_cli_reports_errors(tmp_path):
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dimo_jax.convert", "google-maskgit",
                         f"--input={tmp_path / 'absent_checkpoint'}", f"--output={tmp_path / 'o'}"],
                        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                        env=env, timeout=120)
  assert proc.returncode == 2
  assert "error: Google MaskGIT checkpoint not found" in proc.stderr and "absent_checkpoint" in proc.stderr


# ------------------------------------------------------------------ hostile and broken files


def _raw_safetensors(path, header, data=b""):
  """A .safetensors file with exactly this header (any JSON value or raw bytes) and data."""
  import struct
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
  return str(path)


_F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,words", [
    ([1, 2], "is a JSON list, not an object"),
    ({"w": [1]}, "'w' is described by a JSON list"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "'w' has no data_offsets"),
    ({"w": {**_F32x2, "shape": "2"}}, "'w' has shape 2, not a list"),
    ({"w": {**_F32x2, "shape": [-2]}}, "'w' has shape"),
    ({"w": {**_F32x2, "shape": [True, 2]}}, "'w' has shape"),
    ({"w": {**_F32x2, "data_offsets": ["0", "8"]}}, "'w' has data_offsets"),
    ({"w": {**_F32x2, "data_offsets": [8, 0]}}, "0 <= begin <= end"),
    ({"w": {**_F32x2, "dtype": 4}}, "'w' has dtype 4, which cannot be read"),
    ({"w": _F32x2, "__metadata__": {"a": {"b": 1}}}, "__metadata__ is not an object of strings"),
    ({"w": {**_F32x2, "data_offsets": [0, 16]}}, "'w' lies outside the file"),
    ({"w": _F32x2, "v": {**_F32x2, "data_offsets": [4, 12], "shape": [2]}}, "overlap"),
    (b'{"w": 1, "w": 2}', "appears twice"),
    (b"\xff\xfe{}", "not JSON"),
])
def test_safetensors_header_checked(tmp_path, header, words):
  from dimo_jax.converters import safetensors_io
  path = _raw_safetensors(tmp_path / "w.safetensors", header, np.arange(3, dtype=np.float32).tobytes())
  with pytest.raises(checkpoints.UserError) as err:
    safetensors_io.load_safetensors(path)
  assert path in str(err.value) and words in str(err.value) and "download the file again" in str(err.value)
  assert len(str(err.value).splitlines()) == 1


def test_safetensors_good_file_and_sharded_index(tmp_path):
  from dimo_jax.converters import safetensors_io
  import ml_dtypes
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1.5, -2], dtype=ml_dtypes.bfloat16)
  safetensors_io.save_safetensors(str(tmp_path / "x-1.safetensors"), {"a": a})
  safetensors_io.save_safetensors(str(tmp_path / "x-2.safetensors"), {"b": b, "n": np.arange(2)})
  index = tmp_path / "x.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a": "x-1.safetensors", "b": "x-2.safetensors"}}))
  out = safetensors_io.load_safetensors(str(tmp_path))
  np.testing.assert_array_equal(out["a"], a)
  assert out["b"].dtype == np.float32 and out["b"].tolist() == [1.5, -2.0]  # bfloat16 cast as a float
  assert out["n"].dtype == np.int64
  index.write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
  with pytest.raises(checkpoints.UserError, match=r"x.safetensors.index.json: weight_map names "
                     r"'../outside.safetensors', not a .safetensors file beside the index"):
    safetensors_io.load_safetensors(str(tmp_path))
  index.write_bytes(b'{"weight_map": {"a": "x-1.safe\xe9tensors"}}')
  with pytest.raises(checkpoints.UserError, match=r"index.json, line 1: not UTF-8 text \(byte 0xe9"):
    safetensors_io.load_safetensors(str(tmp_path))


def _tiny_clip(folder, config, dtype=np.float32, poison=None, hf=None):
  """A numpy-made CLIP text release (config.json + model.safetensors) at ``config``'s sizes."""
  from dimo_jax.converters import clip_text
  from dimo_jax.converters.safetensors_io import save_safetensors
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  sd = {k: rng.normal(0, 0.1, s).astype(dtype) for k, s in clip_text.clip_text_layout(config).items()}
  sd[clip_text.POSITION_IDS] = np.arange(config.max_positions, dtype=np.int64)[None]
  for key, value in (poison or {}).items():
    sd[key].reshape(-1)[: len(value)] = value
  save_safetensors(os.path.join(folder, "model.safetensors"), sd)
  c = config
  hf = hf if hf is not None else {
      "vocab_size": c.vocab_size, "hidden_size": c.width, "intermediate_size": c.mlp_dim,
      "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "max_position_embeddings": c.max_positions,
      "hidden_act": c.activation, "projection_dim": c.projection_dim, "eos_token_id": c.eos_token_id}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f)
  return str(folder)


def _clip_config():
  from dimo_jax.networks.clip_text import CLIPTextConfig
  return CLIPTextConfig(vocab_size=12, width=8, layers=2, heads=2, mlp_dim=16, max_positions=5,
                        projection_dim=8)


def test_config_json_values_checked_by_type(tmp_path):
  from dimo_jax.converters import clip_text, meissonic, meissonic_vq
  folder = _tiny_clip(tmp_path / "clip", _clip_config())
  cfg = os.path.join(folder, "config.json")
  good = json.load(open(cfg))
  for change, words in (({"num_hidden_layers": "two"}, '"num_hidden_layers" is "two", expected an integer >= 1'),
                        ({"layer_norm_eps": "tiny"}, '"layer_norm_eps" is "tiny", expected a finite number'),
                        ({"hidden_size": True}, '"hidden_size" is true, expected an integer >= 1'),
                        ({"text_config": [1]}, '"text_config" is [1], expected a JSON object'),
                        ({"text_config": {"vocab_size": -3}}, '(text_config): "vocab_size" is -3')):
    with open(cfg, "w") as f:
      json.dump({**good, **change}, f)
    with pytest.raises(checkpoints.UserError) as err:
      clip_text.convert_clip_text(folder, str(tmp_path / "out"))
    assert cfg in str(err.value) and words in str(err.value) and "--input=<Meissonic>/text_encoder" in str(err.value)
  with pytest.raises(checkpoints.UserError, match=r'"num_layers" is "two", expected an integer >= 1; pass '
                     "Meissonic's transformer/ folder"):
    meissonic.config_from_diffusers({"num_layers": "two"}, "t/config.json")
  with pytest.raises(checkpoints.UserError, match=r'"axes_dims_rope" is \[16, "x"\], expected a list of integers'):
    meissonic.config_from_diffusers({"axes_dims_rope": [16, "x"]}, "t/config.json")
  with pytest.raises(checkpoints.UserError, match=r'v/config.json: "block_out_channels" is "wide"'):
    meissonic_vq.config_from_diffusers({"block_out_channels": "wide"}, "v/config.json")
  with pytest.raises(checkpoints.UserError, match=r"v/config.json: holds a JSON list, not an object"):
    meissonic_vq.config_from_diffusers([], "v/config.json")
  # A byte-order mark is dropped; bytes that are not UTF-8 are named with the file.
  with open(cfg, "wb") as f:
    f.write(b"\xef\xbb\xbf" + json.dumps(good).encode())
  clip_text.convert_clip_text(folder, str(tmp_path / "bom"))
  with open(cfg, "wb") as f:
    f.write(json.dumps({**good, "hidden_act": "g\xe9lu"}, ensure_ascii=False).encode("latin-1"))
  with pytest.raises(checkpoints.UserError, match=r"config.json, line 1: not UTF-8 text \(byte 0xe9 at offset"):
    clip_text.convert_clip_text(folder, str(tmp_path / "latin"))


def test_integer_and_nonfinite_weights_refused_by_name(tmp_path):
  from dimo_jax.converters import clip_text, common
  config = _clip_config()
  emb = "text_model.embeddings.token_embedding.weight"
  ints = _tiny_clip(tmp_path / "ints", config, dtype=np.int32)
  with pytest.raises(checkpoints.UserError,
                     match=r"ints: weights stored as integers.*token_embedding.weight \(int32\).* and 29 more"):
    clip_text.convert_clip_text(ints, str(tmp_path / "o1"))
  bad = _tiny_clip(tmp_path / "nan", config, poison={emb: [np.nan, np.inf, -np.inf]})
  with pytest.raises(checkpoints.UserError) as err:
    clip_text.convert_clip_text(bad, str(tmp_path / "o2"))
  assert f"non-finite (NaN / inf) weights: {emb} (3 of 96)" in str(err.value)
  assert "--allow_nonfinite" in str(err.value) and not os.path.exists(tmp_path / "o2")
  clip_text.convert_clip_text(bad, str(tmp_path / "o3"), allow_nonfinite=True)
  _, params = clip_text.load_clip_text(str(tmp_path / "o3"))
  assert np.isnan(params["token_embedding"]["embedding"][0, 0])
  # The integer buffers keep their integer dtype; a weight's dtype is judged by its role.
  common.check_weights({"a.position_ids": np.arange(3), "b.num_batches_tracked": np.int64(4),
                        "c.weight": np.ones(2, np.float16)}, "sd")
  with pytest.raises(checkpoints.UserError, match=r"sd: weights stored as integers.*c.weight \(bool\)"):
    common.check_weights({"c.weight": np.ones(2, bool)}, "sd")


def test_cli_nonfinite_exit_2_then_allowed(tmp_path):
  import subprocess
  import sys
  config = _clip_config()
  bad = _tiny_clip(tmp_path / "nan", config,
                   poison={"text_model.final_layer_norm.weight": [np.nan]})
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(__file__))
  cmd = [sys.executable, "-m", "dimo_jax.convert", "clip-text", f"--input={bad}", f"--output={tmp_path / 'o'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "text_model.final_layer_norm.weight (1 of 8)" in proc.stderr and "Traceback" not in proc.stderr
  proc = subprocess.run(cmd + ["--allow_nonfinite"], capture_output=True, text=True, cwd=root, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert os.path.isfile(tmp_path / "o" / "params.msgpack")


def _legacy_torch_file(path, numel_op):
  """A legacy (non-zip) torch file of one 5-element float storage whose declared element count
  is replaced by the pickle opcode ``numel_op``."""
  import io
  torch = pytest.importorskip("torch")
  buf = io.BytesIO()
  torch.save({"w": torch.arange(5, dtype=torch.float32)}, buf, _use_new_zipfile_serialization=False)
  raw = buf.getvalue()
  at = raw.index(b"cpuq\x06K\x05") + 5
  path.write_bytes(raw[:at] + numel_op + raw[at + 2:])
  return str(path)


def _zip_torch_file(path, replace):
  import zipfile
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.arange(5, dtype=torch.float32)}, str(path) + ".orig")
  with zipfile.ZipFile(str(path) + ".orig") as src, zipfile.ZipFile(path, "w") as out:
    for name in src.namelist():
      data = src.read(name)
      out.writestr(name, replace(data) if name.endswith("data.pkl") else data)
  return str(path)


def test_tiny_pickles_asking_for_huge_allocations_are_refused_first(tmp_path, monkeypatch):
  import struct
  torch = pytest.importorskip("torch")
  fine = _legacy_torch_file(tmp_path / "fine.pt", b"K\x05")
  assert torch_files.load_torch_file(fine)["w"].tolist() == [0, 1, 2, 3, 4]
  huge = b"J" + struct.pack("<i", 2**31 - 1)
  cases = {
      "legacy.pt": (_legacy_torch_file(tmp_path / "legacy.pt", huge), "declares tensors of 8589934588 bytes"),
      "zip.pt": (_zip_torch_file(tmp_path / "zip.pt", lambda d: d.replace(b"cpuq\x06K\x05", b"cpuq\x06" + huge)),
                 "storage 0 declares 2147483647 elements"),
      "bytearray.pt": (_zip_torch_file(tmp_path / "bytearray.pt", lambda d: b"\x80\x02c__builtin__\nbytearray\n"
                                       + b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"\x85R."),
                       "calls builtins.bytearray for 1099511627776 elements"),
  }
  bytes8 = tmp_path / "bytes8.pt"
  bytes8.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc")
  cases["bytes8.pt"] = (str(bytes8), "expected 1099511627776 bytes in a bytes8")
  monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached a hostile file"))
  for name, (path, words) in cases.items():
    with pytest.raises(checkpoints.UserError) as err:
      torch_files.load_torch_file(path, placeholders=True)
    assert path in str(err.value) and words in str(err.value), name
  with pytest.raises(torch_files.pickle.UnpicklingError, match=r"bytes\(1099511627776\); refused"):
    torch_files._bounded(bytes)(2**40)  # pylint: disable=protected-access
  assert torch_files._bounded(range)(3) == range(3)  # pylint: disable=protected-access
