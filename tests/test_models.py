import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dimo_jax.networks import maskgit

K, L, C = 16, 12, 5


def small(arch="preln", **kw):
  cls = maskgit.ARCHS[arch]
  return cls(codebook_size=K, seq_len=L, num_classes=C, width=32, depth=3, heads=4, mlp_dim=64, **kw)


def inputs(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, K + 1, (batch, L)).astype(np.int32)  # K is the mask
  labels = rng.integers(0, C + 1, (batch,)).astype(np.int32)  # C is the null class
  return jnp.asarray(tokens), jnp.asarray(labels)


@pytest.mark.parametrize("arch", ["preln", "bert"])
def test_shapes_and_param_layout(arch):
  m = small(arch)
  p = maskgit.init_params(m, jax.random.key(0))
  out = m.apply({"params": p}, *inputs())
  assert out.shape == (3, L, K + 1) and out.dtype == jnp.float32
  assert p["blocks"]["fc1"]["kernel"].shape == (3, 32, 64)  # stacked by nn.scan
  rows = K + C + 2 if arch == "preln" else K + C + 1
  assert p["tok_emb"]["embedding"].shape == (rows, 32)
  assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("arch,remat", [("preln", "none"), ("preln", "full"), ("bert", "dots")])
def test_scanned_equals_unrolled(arch, remat):
  m = small(arch, remat=remat)
  p = maskgit.init_params(m, jax.random.key(1))
  unrolled = m.clone(scan=False)
  pu = maskgit.unstack_layers(p, 3)
  assert jax.tree_util.tree_structure(pu) == jax.tree_util.tree_structure(
      maskgit.init_params(unrolled, jax.random.key(1)))
  x, y = inputs(1)
  kw = dict(noise_sigma=0.2, rngs={"noise": jax.random.key(5)})
  a = m.apply({"params": p}, x, y, **kw)
  b = unrolled.apply({"params": pu}, x, y, **kw)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
  back = maskgit.stack_layers(pu, 3)
  chex_equal = jax.tree_util.tree_map(lambda u, v: bool(jnp.all(u == v)), p, back)
  assert all(jax.tree_util.tree_leaves(chex_equal))


def test_gradients_scanned_equal_unrolled():
  m = small(remat="full")
  p = maskgit.init_params(m, jax.random.key(2))
  x, y = inputs(2)
  loss = lambda mod, pp: jnp.sum(jnp.sin(mod.apply({"params": pp}, x, y)))
  g1 = maskgit.unstack_layers(jax.grad(lambda pp: loss(m, pp))(p), 3)
  g2 = jax.grad(lambda pp: loss(m.clone(scan=False, remat="none"), pp))(maskgit.unstack_layers(p, 3))
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_bf16_compute_fp32_params():
  m = small(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  p = maskgit.init_params(m, jax.random.key(3))
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(p))
  x, y = inputs(3)
  out16 = m.apply({"params": p}, x, y)
  out32 = small().apply({"params": p}, x, y)
  assert out16.dtype == jnp.float32  # logits_dtype
  assert m.clone(logits_dtype=jnp.bfloat16).apply({"params": p}, x, y).dtype == jnp.bfloat16
  err = np.abs(np.asarray(out16) - np.asarray(out32)).max() / np.abs(np.asarray(out32)).max()
  assert 0 < err < 0.05  # bf16 really is used, and stays close


def test_class_token_and_null_class():
  m = small()
  p = maskgit.init_params(m, jax.random.key(4))
  x, _ = inputs(4, batch=1)
  outs = [m.apply({"params": p}, x, jnp.array([c])) for c in range(C + 1)]
  # Each label (null included) gives its own output; the null class is its own embedding row.
  for i in range(C + 1):
    for j in range(i + 1, C + 1):
      assert not np.allclose(outs[i], outs[j])
  # The null row is the last row of the table: zeroing it changes only null-class outputs.
  p2 = jax.tree_util.tree_map(lambda a: a, p)
  p2["tok_emb"]["embedding"] = p["tok_emb"]["embedding"].at[K + C + 1].set(0.0)
  np.testing.assert_array_equal(m.apply({"params": p2}, x, jnp.array([0])), outs[0])
  assert not np.allclose(m.apply({"params": p2}, x, jnp.array([C])), outs[C])


def test_class_token_first_vs_last_differs():
  p = maskgit.init_params(small(), jax.random.key(5))
  x, y = inputs(5)
  a = small().apply({"params": p}, x, y)
  b = small(class_token="first").apply({"params": p}, x, y)
  assert not np.allclose(a, b)


def test_embedding_noise_statistics():
  m = small()
  p = maskgit.init_params(m, jax.random.key(6))
  x, y = inputs(6, batch=64)
  sigma = 0.3
  get = lambda s, k: m.apply({"params": p}, x, y, noise_sigma=s, rngs={"noise": k},
                             mutable=["intermediates"])[1]["intermediates"]["token_embeddings"][0]
  clean = get(0.0, jax.random.key(0))
  noisy = get(sigma, jax.random.key(7))
  eps = (np.asarray(noisy) - np.sqrt(1 - sigma**2) * np.asarray(clean)) / sigma
  assert abs(eps.mean()) < 0.02 and abs(eps.std() - 1.0) < 0.02
  # sigma = 1 replaces every visual token by noise: the tokens no longer matter, the class does.
  k = jax.random.key(8)
  x2 = jnp.roll(x, 1, axis=1)
  a = m.apply({"params": p}, x, y, noise_sigma=1.0, rngs={"noise": k})
  b = m.apply({"params": p}, x2, y, noise_sigma=1.0, rngs={"noise": k})
  np.testing.assert_allclose(a, b, atol=1e-5)
  c = m.apply({"params": p}, x, (y + 1) % (C + 1), noise_sigma=1.0, rngs={"noise": k})
  assert not np.allclose(a, c)


def test_dropout_is_stochastic_only_when_training():
  m = small(dropout=0.5)
  p = maskgit.init_params(m, jax.random.key(9))
  x, y = inputs(9)
  a = m.apply({"params": p}, x, y, deterministic=False, rngs={"dropout": jax.random.key(1)})
  b = m.apply({"params": p}, x, y, deterministic=False, rngs={"dropout": jax.random.key(2)})
  c = m.apply({"params": p}, x, y)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(c, maskgit.with_dropout(m, 0.0).apply({"params": p}, x, y))


def test_build_model_from_config_and_errors():
  cfg = ml_collections.ConfigDict(dict(arch="preln", width=32, depth=2, heads=4, mlp_dim=64, dtype="bfloat16"))
  m = maskgit.build_model(cfg, codebook_size=K, seq_len=L, num_classes=C)
  assert isinstance(m, maskgit.MaskTransformer) and m.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="arch='gpt'"):
    maskgit.build_model(ml_collections.ConfigDict(dict(arch="gpt")), codebook_size=K, seq_len=L, num_classes=C)
  with pytest.raises(ValueError, match="heads=5"):
    maskgit.build_model(ml_collections.ConfigDict(dict(width=32, heads=5)), codebook_size=K, seq_len=L,
                       num_classes=C)
  with pytest.raises(ValueError, match="dtype 'fp8'"):
    maskgit.to_dtype("fp8")


def test_maskgit_size_holds_teacher_layout():
  m = maskgit.MaskTransformer(codebook_size=1024, seq_len=256, num_classes=1000, width=768, depth=24, heads=16,
                             mlp_dim=3072)
  shapes = jax.eval_shape(lambda: maskgit.init_params(m, jax.random.key(0)))
  assert shapes["tok_emb"]["embedding"].shape == (2026, 768)
  assert shapes["pos_emb"].shape == (1, 257, 768)
  assert shapes["out_bias"].shape == (257, 2026)
  assert shapes["blocks"]["attn"]["qkv"]["kernel"].shape == (24, 768, 2304)
  n = maskgit.count_params(shapes)
  assert 170e6 < n < 180e6  # about 174M
  bert = maskgit.BertMaskTransformer(codebook_size=1024, seq_len=256, num_classes=1000, width=768, depth=24,
                                    heads=16, mlp_dim=3072)
  nb = maskgit.count_params(jax.eval_shape(lambda: maskgit.init_params(bert, jax.random.key(0))))
  assert 170e6 < nb < 175e6  # about 172.5M


def test_frozen_mask():
  p = maskgit.init_params(small(), jax.random.key(0))
  fm = maskgit.frozen_mask(p)
  assert all(jax.tree_util.tree_leaves(fm["tok_emb"])) and fm["pos_emb"] and fm["out_bias"]
  assert not any(jax.tree_util.tree_leaves(fm["blocks"]))


class ModelVariantsTest(chex.TestCase):
  """The scanned network's logits and parameter gradients: shapes, finiteness, jit against eager,
  and the unrolled network's gradient tree."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_apply_and_gradients(self):
    m = maskgit.ARCHS["preln"](codebook_size=K, seq_len=L, num_classes=C, width=16, depth=2, heads=2, mlp_dim=32,
                               remat="dots")
    p = maskgit.init_params(m, jax.random.key(3))
    x, y = inputs(4, batch=2)
    out = self.variant(lambda pp, t, c: m.apply({"params": pp}, t, c))(p, x, y)
    chex.assert_shape(out, (2, L, K + 1))
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out, m.apply({"params": p}, x, y), atol=1e-5)
    loss = lambda mod, pp: jnp.mean(jax.nn.logsumexp(mod.apply({"params": pp}, x, y), axis=-1))
    grads = self.variant(jax.grad(lambda pp: loss(m, pp)))(p)
    chex.assert_trees_all_equal_shapes(grads, p)
    chex.assert_tree_all_finite(grads)
    chex.assert_tree_shape_prefix(grads["blocks"], (2,))  # stacked over the 2 layers by nn.scan
    unrolled = jax.grad(lambda pp: loss(m.clone(scan=False, remat="none"), pp))(maskgit.unstack_layers(p, 2))
    chex.assert_trees_all_close(maskgit.unstack_layers(grads, 2), unrolled, atol=1e-4, rtol=1e-4)
