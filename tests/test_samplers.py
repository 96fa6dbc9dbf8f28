"""Tests for dimo_jax.core.samplers with hand-made logits tables and one tiny transformer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.core import masking, samplers

K = 4  # codebook size; mask id = K
L = 6
C = 3  # classes; null label = C


def table_apply(params, tokens, labels):
  """Context-free model: logits[b, l] = table[labels[b], l] (the mask column is huge)."""
  del tokens
  return params["table"][labels]


def make_table(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(C + 1, L, K + 1)).astype(np.float32) * scale
  table[..., K] = 50.0  # a sampler that drew from the mask column would emit mask ids
  return {"table": jnp.asarray(table)}


def softmax_np(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


B = 1024  # one batch size everywhere: the samplers compile once per static configuration
LABELS = jnp.asarray(np.arange(B) % C, jnp.int32)


def key(i):
  """Typed keys with the rbg generator (fast to compile on CPU); raw uint32 keys are tested too."""
  return jax.random.key(i, impl="rbg")


# --------------------------------------------------------------------------- filter_logits


def test_temperature_scales_logits():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7)), jnp.float32)
  np.testing.assert_allclose(samplers.filter_logits(x, 2.0), x / 2.0, rtol=1e-6)
  np.testing.assert_array_equal(samplers.filter_logits(x, 1.0), x)


def test_top_k_keeps_exactly_k_largest():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3, 10)), jnp.float32)
  out = np.asarray(samplers.filter_logits(x, 1.0, top_k=3))
  kept = np.isfinite(out)
  assert (kept.sum(-1) == 3).all()
  top3 = np.argsort(-np.asarray(x), axis=-1)[..., :3]
  expect = np.zeros_like(kept)
  np.put_along_axis(expect, top3, True, axis=-1)
  np.testing.assert_array_equal(kept, expect)
  np.testing.assert_array_equal(out[kept], np.asarray(x)[kept])
  # Ties still leave exactly k candidates; k >= V is a no-op.
  assert int(np.isfinite(samplers.filter_logits(jnp.zeros((2, 8)), 1.0, top_k=2)).sum()) == 4
  np.testing.assert_array_equal(samplers.filter_logits(x, 1.0, top_k=10), x)


@pytest.mark.parametrize("top_p,n_kept", [(0.4, 1), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_minimal_set(top_p, n_kept):
  probs = np.array([0.15, 0.5, 0.05, 0.3])
  x = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  out = np.asarray(samplers.filter_logits(x, 1.0, top_p=top_p))[0]
  kept = np.flatnonzero(np.isfinite(out))
  expect = np.argsort(-probs)[:n_kept]
  assert sorted(kept.tolist()) == sorted(expect.tolist())
  # A traced top_p gives the same set.
  traced = jax.jit(lambda p: samplers.filter_logits(x, 1.0, top_p=p))(jnp.float32(top_p))
  np.testing.assert_array_equal(np.isfinite(np.asarray(traced))[0], np.isfinite(out))


def test_top_p_exact_boundary():
  # Uniform over 4 codes (masses exactly 0.25): the minimal set reaching 0.5 has 2 members.
  out = samplers.filter_logits(jnp.zeros((3, 4)), 1.0, top_p=0.5)
  np.testing.assert_array_equal(np.isfinite(out).sum(-1), [2, 2, 2])


def test_top_k_then_top_p_renormalises():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  x = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  # After top-2 the renormalised masses are 0.625, 0.375: top_p 0.6 keeps 1, 0.7 keeps 2.
  assert int(np.isfinite(samplers.filter_logits(x, 1.0, top_k=2, top_p=0.6)).sum()) == 1
  assert int(np.isfinite(samplers.filter_logits(x, 1.0, top_k=2, top_p=0.7)).sum()) == 2


def test_zero_temperature_is_argmax():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 9)), jnp.float32)
  out = np.asarray(samplers.filter_logits(x, 0.0))
  np.testing.assert_array_equal(np.isfinite(out).sum(-1), 1)
  np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(np.asarray(x), -1))
  traced = jax.jit(lambda t: samplers.filter_logits(x, t))(jnp.float32(0.0))
  np.testing.assert_array_equal(np.asarray(traced), out)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                    dict(top_k=-1), dict(top_k=2.5)])
def test_filter_bad_input(kwargs):
  with pytest.raises(ValueError):
    samplers.filter_logits(jnp.zeros((2, 4)), **{"temperature": 1.0, **kwargs})


# --------------------------------------------------------------------------- guidance


def counting_apply(calls):
  def apply_fn(params, tokens, labels):
    calls.append(tokens.shape[0])
    return table_apply(params, tokens, labels)
  return apply_fn


def test_guidance_known_answer_and_one_batched_call():
  params = make_table(3)
  tokens = jnp.full((B, L), K, jnp.int32)
  calls = []
  out = samplers.guided_logits(counting_apply(calls), params, tokens, LABELS, 2.5, null_label=C)
  assert calls == [2 * B]  # both branches in one forward over the concatenated batch
  t = np.asarray(params["table"])
  cond, uncond = t[np.asarray(LABELS)], t[C][None]
  np.testing.assert_allclose(out, uncond + 2.5 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guidance_weight_one_and_zero():
  params = make_table(4)
  tokens = jnp.full((B, L), K, jnp.int32)
  calls = []
  w1 = samplers.guided_logits(counting_apply(calls), params, tokens, LABELS, 1.0, null_label=None)
  assert calls == [B]  # static w = 1: the unconditional branch is skipped
  np.testing.assert_array_equal(w1, table_apply(params, tokens, LABELS))
  null = jnp.full_like(LABELS, C)
  w0 = samplers.guided_logits(table_apply, params, tokens, LABELS, 0.0, null_label=C)
  np.testing.assert_array_equal(w0, table_apply(params, tokens, null))
  # Traced weights run both branches and agree with the static shortcuts.
  f = jax.jit(lambda w: samplers.guided_logits(table_apply, params, tokens, LABELS, w, C))
  np.testing.assert_allclose(f(jnp.float32(1.0)), w1, atol=1e-6)
  np.testing.assert_allclose(f(jnp.float32(0.0)), w0, atol=1e-6)


def test_guidance_needs_null_label():
  tokens = jnp.full((B, L), K, jnp.int32)
  with pytest.raises(ValueError, match="null_label"):
    samplers.guided_logits(table_apply, make_table(), tokens, LABELS, 2.0)
  with pytest.raises(ValueError, match="null_label"):
    samplers.confidence_sampler(table_apply, make_table(), key(0), LABELS, seq_len=L,
                                codebook_size=K, steps=2, guidance=2.0)
  with pytest.raises(ValueError, match="null_label"):
    samplers.ancestral_sampler(table_apply, make_table(), key(0), LABELS, seq_len=L,
                               codebook_size=K, steps=2, guidance_schedule="linear")


# --------------------------------------------------------------------------- iterative samplers
# Most tests share one static configuration (steps 1, 2, 5 or L, return_history=True) so that
# each sampler compiles a handful of times only.

SAMPLERS = {
    "confidence": samplers.confidence_sampler,
    "ancestral": samplers.ancestral_sampler,
}


def run(name, params, k, labels=LABELS, steps=5, **kw):
  out, hist = SAMPLERS[name](table_apply, params, k, labels, seq_len=L, codebook_size=K,
                             steps=steps, return_history=True, **kw)
  return np.asarray(out), np.asarray(hist)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5, L])
def test_fills_every_token_and_follows_step_counts(name, steps):
  tokens, hist = run(name, make_table(5), key(steps), steps=steps)
  assert tokens.shape == (B, L) and tokens.dtype == np.int32
  assert hist.shape == (steps, B, L)
  assert ((tokens >= 0) & (tokens < K)).all()
  np.testing.assert_array_equal(hist[-1], tokens)
  expect = L - np.cumsum(masking.step_counts("arccos", L, steps))
  np.testing.assert_array_equal((hist == K).sum(-1), np.repeat(expect[:, None], B, axis=1))
  # Revealed tokens never change afterwards.
  for t in range(1, steps):
    seen = hist[t - 1] != K
    np.testing.assert_array_equal(hist[t][seen], hist[t - 1][seen])


def test_one_step_confidence_is_independent_sampling():
  params = make_table(6)
  labels = jnp.zeros((B,), jnp.int32)
  out, _ = run("confidence", params, key(7), labels, steps=1)
  # The documented draw: Gumbel-max with gumbel(split(key, T)[t], [B, L, K + 1])[..., :K].
  g = jax.random.gumbel(jax.random.split(key(7), 1)[0], (B, L, K + 1))
  logits = params["table"][labels][..., :K]
  np.testing.assert_array_equal(out, np.argmax(np.asarray(logits + g[..., :K]), -1))
  # Frequencies match softmax of the codebook columns (the mask column is never drawn).
  freq = np.stack([(out == k).mean(0) for k in range(K)], -1)
  np.testing.assert_allclose(freq, softmax_np(np.asarray(params["table"][0, :, :K])), atol=0.06)


def test_ancestral_marginals_match_context_free_model():
  params = make_table(8)
  out, hist = run("ancestral", params, key(9), jnp.ones((B,), jnp.int32), steps=L)
  freq = np.stack([(out == k).mean(0) for k in range(K)], -1)
  np.testing.assert_allclose(freq, softmax_np(np.asarray(params["table"][1, :, :K])), atol=0.06)
  # Reveal order is uniform: the position revealed first is spread over all positions.
  first = np.argmax(hist[0] != K, axis=-1)
  share = np.bincount(first, minlength=L) / B
  np.testing.assert_allclose(share, np.full(L, 1.0 / L), atol=0.05)


def support_table():
  """Position j is uniform over the first m_j codes (m = 3, 1, 4, 2, 1, 3)."""
  sizes = np.array([3, 1, 4, 2, 1, 3])
  table = np.full((C + 1, L, K + 1), -1e4, np.float32)
  for j, m in enumerate(sizes):
    table[:, j, :m] = 0.0
  table[..., K] = 50.0
  return {"table": jnp.asarray(table)}, sizes


def test_confidence_reveals_most_confident_first():
  params, sizes = support_table()
  _, hist = run("confidence", params, key(1), steps=L, r_temp=0.0)
  reveal_step = (hist == K).sum(0)  # a position revealed at step t was masked after t steps
  # Confidence log(1/m_j): a smaller support is revealed no later than a larger one.
  for i in range(L):
    for j in range(L):
      if sizes[i] < sizes[j]:
        assert (reveal_step[:, i] <= reveal_step[:, j]).all(), (i, j)
  # Large Gumbel noise randomises the order across rows.
  _, noisy = run("confidence", params, key(1), steps=L, r_temp=100.0)
  orders = {tuple(row) for row in np.argsort((noisy == K).sum(0), axis=-1)[:50]}
  assert len(orders) > 10


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_visible_tokens_are_kept(name):
  params = make_table(10, scale=3.0)
  rng = np.random.default_rng(11)
  init = np.full((B, L), K, np.int32)
  visible = rng.random((B, L)) < 0.5
  visible[0] = False  # an all-mask row
  visible[1, :] = True
  visible[1, 2] = False  # a single mask
  init[visible] = rng.integers(0, K, size=int(visible.sum()))
  out, hist = run(name, params, key(12), init_tokens=jnp.asarray(init))
  assert (out != K).all()
  np.testing.assert_array_equal(out[visible], init[visible])
  for t in range(len(hist)):
    np.testing.assert_array_equal(hist[t][visible], init[visible])
  # A row with n0 masks keeps round(n0 * remaining_t / L) masks after step t.
  n0 = (init == K).sum(-1)
  remaining = L - np.cumsum(masking.step_counts("arccos", L, 5))
  expect = (n0[None, :] * remaining[:, None] + L // 2) // L
  np.testing.assert_array_equal((hist == K).sum(-1), expect)


def test_zero_temperature_sampler_is_argmax():
  params = make_table(13)
  argmax = np.argmax(np.asarray(params["table"][LABELS][..., :K]), -1)
  for name in SAMPLERS:
    for temp in (0.0, 1e-4):
      out, _ = run(name, params, key(14), temperature=temp)
      np.testing.assert_array_equal(out, argmax, err_msg=f"{name} temperature={temp}")


def test_top_k_one_in_sampler_is_argmax():
  params = make_table(15)
  argmax = np.argmax(np.asarray(params["table"][LABELS][..., :K]), -1)
  out, _ = run("confidence", params, key(16), top_k=1)
  np.testing.assert_array_equal(out, argmax)


def ramp_table(s=30.0):
  """Conditional classes prefer code 0 by s, the null class prefers code 1 by s."""
  table = np.zeros((C + 1, L, K + 1), np.float32)
  table[:C, :, 0] = s
  table[C, :, 1] = s
  table[..., 2:] = -s
  return {"table": jnp.asarray(table)}


def test_linear_guidance_ramp_known_answer():
  # Guided logits s * [w_t, 1 - w_t]; with w = 1 and T = 2 the linear ramp gives w_0 = 0.5
  # (codes 0 and 1 equally likely) and w_1 = 1 (code 0 only); constant w = 1 is code 0 only.
  params = ramp_table()
  out, hist = run("confidence", params, key(17), steps=2, null_label=C,
                  guidance_schedule="linear")
  first = hist[0] != K
  assert set(np.unique(out[first]).tolist()) <= {0, 1}
  assert abs((out[first] == 1).mean() - 0.5) < 0.05
  assert (out[~first] == 0).all()
  const, _ = run("confidence", params, key(17), steps=2, null_label=C)
  assert (const == 0).all()
  uncond, _ = run("confidence", params, key(17), steps=2, null_label=C, guidance=0.0)
  assert (uncond == 1).all()  # w = 0 is the unconditional model


def test_jit_with_traced_knobs_matches_eager():
  params = make_table(18)
  kw = dict(seq_len=L, codebook_size=K, steps=3, null_label=C)
  eager = samplers.confidence_sampler(table_apply, params, key(19), LABELS, guidance=2.0,
                                      temperature=0.7, top_p=0.9, **kw)

  @jax.jit
  def jitted(params, k, w, temp, top_p):
    return samplers.confidence_sampler(table_apply, params, k, LABELS, guidance=w,
                                       temperature=temp, top_p=top_p, **kw)

  traced = jitted(params, key(19), jnp.float32(2.0), jnp.float32(0.7), jnp.float32(0.9))
  np.testing.assert_array_equal(traced, eager)
  assert (np.asarray(eager) != K).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps"), (dict(steps=L + 1), "steps"), (dict(schedule="nope"), "schedule"),
    (dict(guidance_schedule="cubic"), "guidance_schedule"), (dict(codebook_size=7), "columns"),
    (dict(init_tokens=jnp.full((B, L + 1), K)), "init_tokens"), (dict(top_k=-2), "top_k"),
    (dict(temperature=-0.5), "temperature"), (dict(top_p=2.0), "top_p"),
])
def test_sampler_bad_input(kwargs, match):
  args = dict(seq_len=L, codebook_size=K, steps=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    samplers.confidence_sampler(table_apply, make_table(), key(0), LABELS, **args)


# --------------------------------------------------------------------------- one-step sampler


def test_one_step_sampler_draws_every_position():
  params = make_table(20, scale=3.0)
  k = jax.random.PRNGKey(21)  # raw uint32 keys work as well
  rng = np.random.default_rng(22)
  x_init = jnp.asarray(np.where(rng.random((B, L)) < 0.5, K, rng.integers(0, K, (B, L))),
                       jnp.int32)
  out = samplers.one_step_sampler(table_apply, params, k, LABELS, x_init, codebook_size=K)
  logits = params["table"][LABELS][..., :K]
  np.testing.assert_array_equal(out, samplers.sample_categorical(k, logits))
  np.testing.assert_array_equal(out, jax.random.categorical(k, logits, axis=-1))
  assert (np.asarray(out) != K).all()
  # Visible positions of x_init are redrawn too: greedy output is the table's argmax everywhere.
  greedy = samplers.one_step_sampler(table_apply, params, key(21), LABELS, x_init,
                                     codebook_size=K, temperature=0.0)
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
  visible = np.asarray(x_init) != K
  assert (np.asarray(greedy)[visible] != np.asarray(x_init)[visible]).any()
  topk = samplers.one_step_sampler(table_apply, params, key(21), LABELS, x_init,
                                   codebook_size=K, top_k=2)
  top2 = np.argsort(-np.asarray(logits), -1)[..., :2]
  assert (np.asarray(topk)[..., None] == top2).any(-1).all()
  with pytest.raises(ValueError, match="labels"):
    samplers.one_step_sampler(table_apply, params, k, LABELS[:2], x_init, codebook_size=K)
  with pytest.raises(ValueError, match="columns"):
    samplers.one_step_sampler(table_apply, params, k, LABELS, x_init, codebook_size=2)


def test_tiny_transformer_end_to_end():
  from configs import digits
  from dimo_jax.networks import maskgit
  cfg = digits.get_config().model
  cfg.width, cfg.depth, cfg.heads, cfg.mlp_dim, cfg.dropout = 16, 1, 2, 32, 0.0
  model = maskgit.build_model(cfg, codebook_size=K, seq_len=L, num_classes=C)
  params = jax.jit(lambda k: maskgit.init_params(model, k))(key(0))

  def apply_fn(p, tokens, labels):
    return model.apply({"params": p}, tokens, labels, deterministic=True)

  labels = LABELS[:4]
  out = samplers.confidence_sampler(apply_fn, params, key(1), labels, seq_len=L,
                                    codebook_size=K, steps=3, guidance=2.0,
                                    guidance_schedule="linear", null_label=model.null_label)
  assert out.shape == (4, L) and ((np.asarray(out) >= 0) & (np.asarray(out) < K)).all()
  x_init = jnp.asarray([[K, 1, K, 3, K, 0]] * 4, jnp.int32)
  one = samplers.one_step_sampler(apply_fn, params, key(3), labels, x_init, codebook_size=K)
  assert one.shape == (4, L) and ((np.asarray(one) >= 0) & (np.asarray(one) < K)).all()
