"""dimo_jax.networks.attention: every implementation against an explicit softmax, in the networks too."""
import contextlib
import dataclasses
import io

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.networks import attention, maskgit
from dimo_jax.networks import meissonic as mnet
from dimo_jax.networks import meissonic_blocks

XLA_IMPLS = ("", "xla", "xla_saved")
# bf16 keeps 8 bits of mantissa: about 4e-3 relative per rounding.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def reference(q, k, v, causal=False):
  """softmax(q k^T / sqrt(D)) v per head, written out: float32 scores, the output in q's dtype;
  ``causal``: the scores of later keys set to -inf."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / np.sqrt(q.shape[-1])
  if causal:
    s = jnp.where(np.tril(np.ones(s.shape[-2:], bool)), s, -jnp.inf)
  e = jnp.exp(s - s.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)


def _qkv(dtype, b=2, t=13, h=3, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (b, t, h, d), jnp.float32).astype(dtype) for k in ks]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", XLA_IMPLS)
def test_values_and_gradients_match_the_explicit_softmax(impl, dtype):
  q, k, v = _qkv(dtype)
  out = attention.attention(q, k, v, impl or None)
  assert out.dtype == dtype and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference(q, k, v), np.float32),
                             rtol=TOL[dtype], atol=TOL[dtype])
  w = jax.random.normal(jax.random.key(5), q.shape).astype(dtype)
  loss = lambda fn: lambda *a: jnp.sum((fn(*a) * w).astype(jnp.float32))
  got = jax.grad(loss(lambda *a: attention.attention(*a, impl)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    assert g.dtype == dtype
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=2 * TOL[dtype] * np.abs(r).max())


@pytest.mark.parametrize("impl", XLA_IMPLS)
def test_causal_values_and_gradients_match_the_explicit_softmax(impl):
  q, k, v = _qkv(jnp.float32, t=7)
  out = attention.attention(q, k, v, impl, causal=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference(q, k, v, causal=True)), rtol=2e-5, atol=2e-5)
  # The first query sees only the first key: its output is v[:, 0].
  np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(v[:, 0]), rtol=1e-6, atol=1e-6)
  w = jax.random.normal(jax.random.key(5), q.shape)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * w)
  got = jax.grad(loss(lambda *a: attention.attention(*a, impl, causal=True)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(lambda *a: reference(*a, causal=True)), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=4e-5 * np.abs(np.asarray(r)).max())
  # The last key reaches only the last query: its gradient is zero when that query's cotangent is.
  w_last = w.at[:, -1].set(0.0)
  gk = jax.grad(lambda k_: jnp.sum(attention.attention(q, k_, v, impl, causal=True) * w_last))(k)
  assert float(jnp.max(jnp.abs(gk[:, -1]))) == 0.0


def _residuals(fn, *args) -> str:
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    ad_checkpoint.print_saved_residuals(fn, *args)
  return buf.getvalue()


def _tiny_preln(impl, dtype=jnp.float32, remat="none", **kw):
  fields = dict(codebook_size=16, seq_len=20, num_classes=3, width=32, depth=2, heads=4, mlp_dim=64,
                dtype=dtype, remat=remat, attention_impl=impl or None)
  fields.update(kw)
  return maskgit.MaskTransformer(**fields)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_keeps_no_score_sized_residual(dtype):
  """Only the unfused path keeps [.., heads, 21, 21] scores / probabilities for the backward pass."""
  toks, labels = jnp.zeros((2, 20), jnp.int32), jnp.zeros((2,), jnp.int32)
  kept = {}
  for impl in ("", "xla_saved"):
    model = _tiny_preln(impl, dtype)
    params = maskgit.init_params(model, jax.random.key(0))
    text = _residuals(lambda p, m=model: m.apply({"params": p}, toks, labels).sum(), params)
    kept[impl] = [line for line in text.splitlines() if ",21,21]" in line]
  assert kept[""] == []
  assert any(line.startswith("f32[") for line in kept["xla_saved"]), kept["xla_saved"]


# Layers' float32 probabilities the unfused path keeps and the fused one does not: all of them
# without remat, the score product of each layer under ``dots``; under ``dots_no_batch`` and
# ``full`` the unfused path recomputes them too, and the fused one only needs less at the peak.
KEPT_LAYERS = {"none": 2, "dots": 1, "dots_no_batch": 0, "full": 0}


@pytest.mark.parametrize("remat", sorted(KEPT_LAYERS))
def test_compiled_backward_needs_fewer_temporaries(remat):
  """XLA's memory analysis of a tiny network's gradient: the fused default below the unfused path
  under every remat policy."""
  toks, labels = jnp.zeros((8, 20), jnp.int32), jnp.zeros((8,), jnp.int32)
  temp = {}
  for impl in ("", "xla_saved"):
    model = _tiny_preln(impl, heads=8, remat=remat)
    params = jax.eval_shape(lambda m=model: maskgit.init_params(m, jax.random.key(0)))
    grad = jax.grad(lambda p, m=model: m.apply({"params": p}, toks, labels).sum())
    temp[impl] = jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes
  # Each kept layer: [8, 8, 21, 21] float32 probabilities, 113 kB.
  assert temp[""] + KEPT_LAYERS[remat] * 8 * 8 * 21 * 21 * 4 < temp["xla_saved"], temp


def _patched_reference(monkeypatch):
  fake = lambda q, k, v, implementation=None: reference(q, k, v)
  monkeypatch.setattr(attention, "attention", fake)
  monkeypatch.setattr(meissonic_blocks, "attention", fake)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("arch", ["preln", "bert"])
def test_maskgit_layouts_equal_the_reference_attention(arch, dtype, monkeypatch):
  cls = maskgit.ARCHS[arch]
  kw = dict(codebook_size=16, seq_len=12, num_classes=3, width=32, depth=2, heads=4, mlp_dim=64, dtype=dtype)
  rng = np.random.default_rng(0)
  toks = jnp.asarray(rng.integers(0, 17, (2, 12)), jnp.int32)
  labels = jnp.asarray([0, 2], jnp.int32)
  params = maskgit.init_params(cls(**kw), jax.random.key(1))
  apply = lambda impl: cls(**kw, attention_impl=impl or None).apply({"params": params}, toks, labels)
  got = {impl: np.asarray(apply(impl)) for impl in XLA_IMPLS}
  with monkeypatch.context() as m:
    _patched_reference(m)
    want = np.asarray(apply(""))
  scale = np.abs(want).max()
  for impl, logits in got.items():
    np.testing.assert_allclose(logits, want, atol=TOL[dtype] * scale, err_msg=f"{arch} {impl!r}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_meissonic_equals_the_reference_attention(dtype, monkeypatch):
  cfg = mnet.MeissonicConfig.tiny(grid=4, dtype=dtype)
  model = mnet.MeissonicTransformer(cfg)
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, cfg.codebook_size, (2, cfg.seq_len)), jnp.int32)
  cond = {"text": jnp.asarray(rng.normal(size=(2, 5, cfg.text_dim)), jnp.float32),
          "pooled": jnp.asarray(rng.normal(size=(2, cfg.pooled_dim)), jnp.float32),
          "micro": jnp.asarray([[1024, 1024, 0, 0, 6]] * 2, jnp.float32)}
  params = model.init({"params": jax.random.key(3)}, tokens, cond)["params"]
  apply = lambda impl: mnet.MeissonicTransformer(dataclasses.replace(cfg, attention_impl=impl)).apply(
      {"params": params}, tokens, cond)
  got = {impl: np.asarray(apply(impl), np.float32) for impl in XLA_IMPLS}
  with monkeypatch.context() as m:
    _patched_reference(m)
    want = np.asarray(apply(""), np.float32)
  scale = np.abs(want).max()
  for impl, logits in got.items():
    np.testing.assert_allclose(logits, want, atol=TOL[jnp.dtype(dtype).type] * scale, err_msg=repr(impl))


def test_unknown_implementation_fails_naming_the_key():
  with pytest.raises(ValueError, match="config.model.attention_impl='flash'.*xla_saved"):
    maskgit.build_model({"attention_impl": "flash"}, codebook_size=8, seq_len=4, num_classes=2)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    mnet.MeissonicConfig.tiny(attention_impl="flash")
  with pytest.raises(ValueError, match="attention_impl"):
    attention.attention(*_qkv(jnp.float32), "flash")


def test_cast_floating_keeps_integers_and_the_tree():
  tree = {"w": jnp.ones((2, 3)), "ids": jnp.arange(3), "inner": {"b": jnp.zeros(4)}}
  cast = maskgit.cast_floating(tree, "bfloat16")
  assert cast["w"].dtype == jnp.bfloat16 and cast["inner"]["b"].dtype == jnp.bfloat16
  assert cast["ids"].dtype == tree["ids"].dtype
  assert jax.tree_util.tree_structure(cast) == jax.tree_util.tree_structure(tree)
