"""CLIP text tower (layout, conversion, parity with PyTorch, exact LayerNorm) and tokenizer."""
import json
import os
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.converters import clip_text as conv
from dimo_jax.converters.common import flatten
from dimo_jax.converters.safetensors_io import save_safetensors
from dimo_jax.data import text
from dimo_jax.networks import clip_text as clip

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

TINY = clip.CLIPTextConfig.tiny()


# ---------------------------------------------------------- PyTorch reference (transformers names)


class _Attention(tnn.Module):

  def __init__(self, c):
    super().__init__()
    self.heads = c.heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (tnn.Linear(c.width, c.width)
                                                            for _ in range(4))

  def forward(self, x):
    b, t, w = x.shape
    d = w // self.heads
    split = lambda a: a.reshape(b, t, self.heads, d).transpose(1, 2)
    q, k, v = split(self.q_proj(x) * d**-0.5), split(self.k_proj(x)), split(self.v_proj(x))
    scores = q @ k.transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, w)
    return self.out_proj(out)


class _MLP(tnn.Module):

  def __init__(self, c):
    super().__init__()
    self.fc1, self.fc2 = tnn.Linear(c.width, c.mlp_dim), tnn.Linear(c.mlp_dim, c.width)
    self.act = (lambda x: x * torch.sigmoid(1.702 * x)) if c.activation == "quick_gelu" else F.gelu

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _Layer(tnn.Module):

  def __init__(self, c):
    super().__init__()
    self.self_attn = _Attention(c)
    self.layer_norm1 = tnn.LayerNorm(c.width, eps=c.ln_eps)
    self.mlp = _MLP(c)
    self.layer_norm2 = tnn.LayerNorm(c.width, eps=c.ln_eps)

  def forward(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class _Embeddings(tnn.Module):

  def __init__(self, c):
    super().__init__()
    self.token_embedding = tnn.Embedding(c.vocab_size, c.width)
    self.position_embedding = tnn.Embedding(c.max_positions, c.width)


class _Encoder(tnn.Module):

  def __init__(self, c):
    super().__init__()
    self.layers = tnn.ModuleList([_Layer(c) for _ in range(c.layers)])


class _TextModel(tnn.Module):

  def __init__(self, c):
    super().__init__()
    self.embeddings = _Embeddings(c)
    self.encoder = _Encoder(c)
    self.final_layer_norm = tnn.LayerNorm(c.width, eps=c.ln_eps)


class TorchCLIPText(tnn.Module):
  """CLIPTextModelWithProjection: returns (hidden_states[-2], text_embeds)."""

  def __init__(self, c):
    super().__init__()
    self.config = c
    self.text_model = _TextModel(c)
    self.text_projection = tnn.Linear(c.width, c.projection_dim, bias=False)

  def forward(self, ids):
    e = self.text_model.embeddings
    x = e.token_embedding(ids) + e.position_embedding(torch.arange(ids.shape[1]))[None]
    hidden = [x]
    for layer in self.text_model.encoder.layers:
      x = layer(x)
      hidden.append(x)
    last = self.text_model.final_layer_norm(x)
    if self.config.eos_token_id == 2:
      pos = ids.argmax(-1)
    else:
      pos = (ids == self.config.eos_token_id).int().argmax(-1)
    pooled = last[torch.arange(ids.shape[0]), pos]
    return hidden[-2], self.text_projection(pooled)


def _torch_model(config, seed=0, offset=0.0):
  torch.manual_seed(seed)
  model = TorchCLIPText(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
    if offset:
      emb = model.text_model.embeddings.token_embedding.weight
      emb.add_(offset * emb.std())  # the same constant in every channel
  return model


def _hf_config(c):
  return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
          "vocab_size": c.vocab_size, "hidden_size": c.width, "intermediate_size": c.mlp_dim,
          "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
          "max_position_embeddings": c.max_positions, "hidden_act": c.activation,
          "layer_norm_eps": c.ln_eps, "projection_dim": c.projection_dim,
          "eos_token_id": c.eos_token_id, "bos_token_id": 0, "pad_token_id": 1}


def _write_release(folder, model, config, position_ids=True):
  os.makedirs(folder, exist_ok=True)
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  if position_ids:  # saved by transformers < 4.31
    sd[conv.POSITION_IDS] = np.arange(config.max_positions, dtype=np.int64)[None]
  save_safetensors(os.path.join(folder, "model.safetensors"), sd)
  save_safetensors(os.path.join(folder, "model.fp16.safetensors"),
                   {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(_hf_config(config), f)
  return sd


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _ids(config, eos, batch=3, seed=0):
  """Prompts of different lengths: start (vocab-3), body, end ``eos``, padded with ``eos``."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, config.max_positions), eos, np.int64)
  for b, n in enumerate([0, 5, config.max_positions - 2][:batch]):
    ids[b, 0] = config.vocab_size - 3
    ids[b, 1:1 + n] = rng.integers(3, 50, n)
  return ids


# ------------------------------------------------------------------ network and converter


def test_full_size_layout_and_param_count():
  config = clip.CLIPTextConfig()
  layout = conv.clip_text_layout(config)
  assert len(layout) == 389
  assert sum(int(np.prod(s)) for s in layout.values()) == 354_032_640
  assert clip.param_count(config) == 354_032_640  # jax.eval_shape, nothing allocated
  flat = {k: tuple(v.shape) for k, v in flatten(clip.abstract_params(config)).items()}
  assert flat == conv.flax_layout(config)
  assert flat["layers/fc1/kernel"] == (24, 1024, 4096)


def test_torch_reference_has_the_released_key_names():
  got = {k: tuple(v.shape) for k, v in _torch_model(TINY).state_dict().items()}
  assert got == conv.clip_text_layout(TINY)


# An offset k * std shared by every channel: float32 spacing at the offset is about k * 1.2e-7 of
# the spread, so one rounding of a residual sum differs by that much between any two
# implementations; k = 20 keeps that under the 1e-5 bound (the LayerNorm test holds k = 100).
@pytest.mark.parametrize("eos_token_id,offset", [(2, 0.0), (60, 0.0), (2, 20.0)],
                         ids=["argmax-pooling", "first-eos-pooling", "large-shared-offset"])
def test_matches_pytorch_through_the_released_files(tmp_path, eos_token_id, offset):
  config = clip.CLIPTextConfig.tiny(eos_token_id=eos_token_id)
  model = _torch_model(config, offset=offset)
  _write_release(tmp_path / "Meissonic" / "text_encoder", model, config)
  out = conv.convert_clip_text(str(tmp_path / "Meissonic"), str(tmp_path / "clip_jax"))
  jmodel, params = conv.load_clip_text(out)
  assert jmodel.config == config

  eos = config.vocab_size - 1 if eos_token_id == 2 else eos_token_id
  ids = _ids(config, eos)
  if eos_token_id != 2:
    ids[1, 8] = config.vocab_size - 1  # a larger id after the end: argmax would pick it
  with torch.no_grad():
    want_pen, want_pooled = (t.numpy() for t in model(torch.from_numpy(ids)))
  got = jax.jit(lambda p, i: jmodel.apply({"params": p}, i))(params, jnp.asarray(ids, jnp.int32))
  assert got["penultimate"].shape == (3, config.max_positions, config.width)
  assert got["pooled"].shape == (3, config.projection_dim)
  errors = _rel(got["penultimate"], want_pen), _rel(got["pooled"], want_pooled)
  print(f"relative errors (penultimate, pooled): {errors}")
  assert max(errors) <= 1e-5


def test_remat_and_bfloat16_compute():
  ids = jnp.asarray(_ids(TINY, TINY.vocab_size - 1), jnp.int32)
  run = lambda model, p: jax.jit(lambda p, i: model.apply({"params": p}, i))(p, ids)
  base = clip.CLIPTextModel(TINY)
  params = jax.jit(base.init)(jax.random.PRNGKey(0), ids)["params"]
  ref = run(base, params)
  again = run(clip.CLIPTextModel(TINY, remat="dots"), params)
  np.testing.assert_allclose(again["pooled"], ref["pooled"], rtol=1e-6, atol=1e-6)
  low = run(clip.CLIPTextModel(TINY, dtype=jnp.bfloat16), params)
  assert low["penultimate"].dtype == jnp.bfloat16
  assert _rel(low["pooled"], ref["pooled"]) < 0.1
  with pytest.raises(ValueError, match="unknown remat policy"):
    jax.eval_shape(lambda: clip.CLIPTextModel(TINY, remat="some").init(jax.random.PRNGKey(0), ids))


def test_attention_implementations_agree_and_a_bad_one_is_named():
  """The tower's attention is ``networks.attention``'s: the fused-backward default, the unfused
  ``xla_saved`` and the gradient through it agree; an unknown ``attention_impl`` fails naming it."""
  ids = jnp.asarray(_ids(TINY, TINY.vocab_size - 1), jnp.int32)
  base = clip.CLIPTextModel(TINY)
  params = jax.jit(base.init)(jax.random.PRNGKey(0), ids)["params"]
  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(model.apply({"params": p}, ids)["pooled"] ** 2)))
  (v_fused, g_fused), (v_saved, g_saved) = loss(base)(params), loss(clip.CLIPTextModel(TINY, attention_impl="xla_saved"))(params)
  np.testing.assert_allclose(v_fused, v_saved, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(g_saved))
  for a, b in zip(jax.tree_util.tree_leaves(g_fused), jax.tree_util.tree_leaves(g_saved)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    jax.eval_shape(lambda: clip.CLIPTextModel(TINY, attention_impl="flash").init(jax.random.PRNGKey(0), ids))


def test_layer_norm_is_exact_at_a_large_shared_offset():
  rng = np.random.default_rng(0)
  spread = 3.0
  x = (100 * spread + spread * rng.standard_normal((4, 7, 256))).astype(np.float32)
  w = (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
  b = (0.1 * rng.standard_normal(256)).astype(np.float32)
  want = F.layer_norm(torch.from_numpy(x), (256,), torch.from_numpy(w), torch.from_numpy(b),
                      1e-5).numpy()
  variables = {"params": {"scale": jnp.asarray(w), "bias": jnp.asarray(b)}}
  got = clip.layer_norm(1e-5, "ln", jnp.float32, jnp.float32).apply(variables, jnp.asarray(x))
  assert _rel(got, want) <= 1e-5
  fast = nn.LayerNorm(epsilon=1e-5, use_fast_variance=True).apply(variables, jnp.asarray(x))
  print(f"LayerNorm relative error: two-pass {_rel(got, want):.2e}, "
        f"one-pass {_rel(fast, want):.2e}")
  assert _rel(fast, want) > _rel(got, want)  # the one-pass E[x^2] - E[x]^2 loses digits here


def test_config_from_json_and_shapes():
  assert conv.config_from_transformers(_hf_config(clip.CLIPTextConfig())) == clip.CLIPTextConfig()
  # Fields a saved config leaves out take transformers' defaults.
  bare = conv.config_from_transformers({})
  assert (bare.width, bare.activation, bare.eos_token_id) == (512, "quick_gelu", 49407)
  nested = conv.config_from_transformers({"text_config": _hf_config(TINY), "projection_dim": 7})
  assert nested == TINY  # the text config's own projection_dim wins
  sd = _torch_model(TINY).state_dict()
  inferred = conv.infer_config(sd)
  assert (inferred.vocab_size, inferred.width, inferred.layers, inferred.mlp_dim,
          inferred.max_positions, inferred.projection_dim) == (64, 32, 3, 64, 16, 24)
  with pytest.raises(ValueError, match="not a CLIP text model"):
    conv.config_from_transformers({"architectures": ["T5EncoderModel"]})


def test_strict_check_names_every_bad_key():
  sd = {k: v.numpy() for k, v in _torch_model(TINY).state_dict().items()}
  sd["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((64, 31), np.float32)
  del sd["text_projection.weight"]
  sd["text_model.embeddings.extra"] = np.zeros(1, np.float32)
  sd[conv.POSITION_IDS] = np.arange(16)[None]
  with pytest.raises(ValueError) as e:
    conv.convert_state_dict(sd, TINY, source="model.safetensors")
  msg = str(e.value)
  assert ("wrong shape: text_model.encoder.layers.1.mlp.fc1.weight: got (64, 31), expected "
          "(64, 32)") in msg
  assert "missing keys (1): text_projection.weight" in msg
  assert "unexpected keys (1): text_model.embeddings.extra" in msg  # position_ids is accepted
  assert "python -m dimo_jax.convert clip-text" in msg


def test_clear_errors_for_wrong_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m dimo_jax.convert clip-text "
                     r"--input=<Meissonic>/text_encoder --output=.*absent"):
    conv.load_clip_text(str(tmp_path / "absent"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
    conv.convert_clip_text(str(tmp_path / "empty"), str(tmp_path / "out"))


# ------------------------------------------------------------------ tokenizer and prompts


def _tiny_vocab(folder, pad=None):
  """A byte-level CLIP-style BPE vocabulary: letters, letters + '</w>', a few merges, specials."""
  os.makedirs(folder, exist_ok=True)
  chars = list(string.ascii_lowercase) + ["!", ".", ","]
  vocab = {}
  for ch in chars:
    vocab[ch] = len(vocab)
  for ch in chars:
    vocab[ch + "</w>"] = len(vocab)
  merges = [("c", "a"), ("ca", "t</w>"), ("s", "a"), ("sa", "t</w>"), ("o", "n</w>")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  if pad is not None:
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
      json.dump({"bos_token": {"content": "<|startoftext|>"}, "eos_token": "<|endoftext|>",
                 "pad_token": {"content": pad, "lstrip": False}}, f)
  return vocab


def test_tokenizer_padding_truncation_and_end_position(tmp_path):
  vocab = _tiny_vocab(tmp_path / "Meissonic" / "tokenizer")
  tok = text.load_tokenizer(str(tmp_path / "Meissonic"))  # the folder holding tokenizer/ works too
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, eos)  # no special_tokens_map: EOS
  words = ["a</w>", "cat</w>", "sat</w>", "on</w>", "!", "!</w>"]
  assert tok.tokenize("  A CAT\n\tsat ON!! ") == words
  ids = tok.encode(["  A CAT\n\tsat ON!! ", "", "cat " * 100])
  assert ids.dtype == np.int32 and ids.shape == (3, 77)
  body = [vocab[t] for t in ["a</w>", "cat</w>", "sat</w>", "on</w>", "!", "!</w>"]]
  assert ids[0, :8].tolist() == [bos] + body + [eos]
  assert (ids[0, 8:] == eos).all()
  assert ids[1, :2].tolist() == [bos, eos] and (ids[1, 2:] == eos).all()
  assert ids[2, 0] == bos and ids[2, 76] == eos and (ids[2, 1:76] == vocab["cat</w>"]).all()
  assert (np.argmax(ids, axis=1) == [7, 1, 76]).all()  # pooling position = first end-of-text

  _tiny_vocab(tmp_path / "padded", pad="!")
  padded = text.load_tokenizer(str(tmp_path / "padded")).encode(["sat"])
  assert padded[0, :3].tolist() == [bos, vocab["sat</w>"], eos]
  assert (padded[0, 3:] == vocab["!"]).all()

  whole = tmp_path / "whole"
  whole.mkdir()
  tok._tok.save(str(whole / "tokenizer.json"))
  np.testing.assert_array_equal(text.load_tokenizer(str(whole)).encode(["  A CAT\n\tsat ON!! "]),
                                ids[:1])


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
    text.load_tokenizer(str(tmp_path / "absent"))
  _tiny_vocab(tmp_path / "tok")
  os.remove(tmp_path / "tok" / "merges.txt")
  with pytest.raises(FileNotFoundError, match="missing merges.txt"):
    text.load_tokenizer(str(tmp_path / "tok"))
  _tiny_vocab(tmp_path / "ok")
  with pytest.raises(ValueError, match="prompt list is empty"):
    text.load_tokenizer(str(tmp_path / "ok")).encode([])


def test_read_prompts(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("  a cat on a mat \n\n\t\nA dog\n")
  assert text.read_prompts(str(path)) == ["a cat on a mat", "A dog"]
  with pytest.raises(FileNotFoundError, match="prompt file not found: .*nothing.txt"):
    text.read_prompts(str(tmp_path / "nothing.txt"))
  (tmp_path / "empty.txt").write_text("\n  \n")
  with pytest.raises(ValueError, match="empty.txt: the prompt file is empty"):
    text.read_prompts(str(tmp_path / "empty.txt"))
  (tmp_path / "long.txt").write_text("short\n\n" + "x" * 30 + "\n")
  with pytest.raises(ValueError, match=r"long.txt, line 3: the prompt has 30 characters, over the "
                     "limit of 20"):
    text.read_prompts(str(tmp_path / "long.txt"), max_chars=20)


def test_vocab_ids_checked_and_against_the_encoder(tmp_path):
  from dimo_jax.storage.checkpoints import UserError
  vocab = _tiny_vocab(tmp_path / "tok")
  path = str(tmp_path / "tok" / "vocab.json")
  for bad, words in ((["a", "0"], "token 'a' has id \"0\", not an integer"),
                     (["a", -1], "token 'a' has id -1, not an integer"),
                     (["a", True], "token 'a' has id true"),
                     (["b", vocab["a"]], "tokens 'a' and 'b' share the id 0")):
    with open(path, "w") as f:
      json.dump({**vocab, bad[0]: bad[1]}, f)
    with pytest.raises(UserError) as err:
      text.load_tokenizer(str(tmp_path / "tok"))
    assert path in str(err.value) and words in str(err.value) and "tokenizer/ folder" in str(err.value)
  with open(path, "w") as f:
    json.dump(vocab, f)
  largest = max(vocab.values())
  tok = text.load_tokenizer(str(tmp_path / "tok"), embedding_rows=largest + 1)
  assert tok.max_id == largest
  with pytest.raises(UserError, match=r"vocab.json \+ merges.txt: token '<\|endoftext\|>' has id "
                     rf"{largest}, beyond the {largest} rows of the text encoder's token embedding"):
    text.load_tokenizer(str(tmp_path / "tok"), embedding_rows=largest)
  # The captioned digits' word tokenizer is checked against the encoder it feeds the same way.
  from dimo_jax.data import captions
  config = captions.encoder_config()
  small = clip.CLIPTextConfig(**{**config.to_dict(), "vocab_size": config.vocab_size - 1})
  with pytest.raises(UserError, match=r"captioned digits vocabulary: token .* beyond the "
                     rf"{config.vocab_size - 1} rows"):
    captions.encode_prompts(["a two"], small, seed=0)


def test_text_files_are_utf8_with_the_file_named_and_no_byte_order_mark(tmp_path):
  from dimo_jax.storage.checkpoints import UserError
  vocab = _tiny_vocab(tmp_path / "tok")
  plain = tmp_path / "plain.txt"
  plain.write_text("a cat\nsat\n", encoding="utf-8")
  bom = tmp_path / "bom.txt"
  bom.write_bytes(b"\xef\xbb\xbfa cat\r\nsat\r\n")
  assert text.read_prompts(str(bom)) == text.read_prompts(str(plain)) == ["a cat", "sat"]
  tok = text.load_tokenizer(str(tmp_path / "tok"))
  first = tok.encode(text.read_prompts(str(bom))[:1])[0]
  assert first[:4].tolist() == [tok.bos_id, vocab["a</w>"], vocab["cat</w>"], tok.eos_id]
  latin = tmp_path / "latin.txt"
  latin.write_bytes("a cat\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(UserError, match=r"latin.txt, line 2: not UTF-8 text \(byte 0xe9 at offset 9\); save the "
                     "file as UTF-8"):
    text.read_prompts(str(latin))
  merges = tmp_path / "tok" / "merges.txt"
  merges.write_bytes(b"#version: 0.2\nc a\n\xff\xfe b\n")
  with pytest.raises(UserError, match=r"merges.txt, line 3: not UTF-8 text \(byte 0xff"):
    text.load_tokenizer(str(tmp_path / "tok"))
  merges.write_bytes(b"\xef\xbb\xbf#version: 0.2\nc a\nca t</w>\n")  # a mark before the header is dropped
  assert text.load_tokenizer(str(tmp_path / "tok")).tokenize("cat") == ["cat</w>"]
  (tmp_path / "tok" / "vocab.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(vocab).encode())
  assert text.load_tokenizer(str(tmp_path / "tok")).tokenize("cat") == ["cat</w>"]
