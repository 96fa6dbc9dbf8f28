import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_simulated_devices

from configs import digits
from dimo_jax.core import divergences, masking, memory, optim
from dimo_jax.method import dimo
from dimo_jax.networks import maskgit

K, L, C = 8, 6, 3


def tiny_setup(**overrides):
  cfg = digits.get_config()
  cfg.distill.batch_size = 8
  cfg.distill.warmup_steps = 0
  cfg.distill.gen_lr = 1e-2
  cfg.distill.aux_lr = 1e-2
  cfg.teacher.guidance = overrides.pop("guidance", 1.0)
  for k, v in overrides.items():
    cfg.distill[k] = v
  model = maskgit.MaskTransformer(codebook_size=K, seq_len=L, num_classes=C, width=16, depth=1, heads=2,
                                 mlp_dim=32, dropout=0.1)
  teacher_params = maskgit.init_params(model, jax.random.key(0))
  dist = dimo.build_distiller(cfg, model)
  return cfg, model, dist, dist.init_state(teacher_params, seed=1)


def test_vjp_gradient_equals_surrogate_loss_gradient():
  """One vjp with cotangent g/B equals jax.grad of 0.5 * sum((z - sg(z - g))^2) / B."""
  _, model, dist, state = tiny_setup()
  key = jax.random.key(3)
  labels, x_init = dist.draw_inputs(key, 8)
  fwd = lambda p: dist.gen_logits(p, x_init, labels, key, 0.1)
  z, vjp_fn = jax.vjp(fwd, state.gen.params)
  x_t, mask, ratio = masking.forward_mask(key, dist.sample_tokens(key, z), K, "arccos")
  t_logits = dist.teacher_logits(state.teacher_params, x_t, labels, ratio, key)
  a_logits = dist.aux_logits(jax.tree_util.tree_map(lambda a: a * 1.1, state.aux.params), x_t, labels, key)
  g_scaled, _ = dist.cotangent(t_logits, a_logits, mask)
  (g_vjp,) = vjp_fn(g_scaled)
  g_raw = jnp.where(mask[..., None], divergences.token_gradient("fkl", t_logits, a_logits), 0.0)

  def surrogate(p):
    zz = fwd(p)
    return 0.5 * jnp.sum(jnp.square(zz - jax.lax.stop_gradient(zz - g_raw))) / 8

  g_auto = jax.grad(surrogate)(state.gen.params)
  for a, b in zip(jax.tree_util.tree_leaves(g_vjp), jax.tree_util.tree_leaves(g_auto)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(g_vjp))) > 0


def test_cotangent_zero_outside_mask_and_normalisations():
  _, _, dist, _ = tiny_setup()
  t = jax.random.normal(jax.random.key(1), (4, L, K + 1))
  a = jax.random.normal(jax.random.key(2), (4, L, K + 1))
  mask = jnp.array([[1, 0, 0, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1, 1]] * 2, bool)
  g, nans = dist.cotangent(t, a, mask)
  assert float(nans) == 0
  assert np.all(np.asarray(g)[~np.asarray(mask)] == 0)
  np.testing.assert_allclose(g, jnp.where(mask[..., None], (jax.nn.softmax(a) - jax.nn.softmax(t)) / 4, 0), atol=1e-6)
  _, _, dist_m, _ = tiny_setup(normalization="masked")
  gm, _ = dist_m.cotangent(t, a, mask)
  np.testing.assert_allclose(gm[0], g[0] / 2, atol=1e-7)  # 2 masked tokens in row 0
  np.testing.assert_allclose(gm[2], g[2] / 6, atol=1e-7)
  # NaN guard
  g_nan, nans = dist.cotangent(t.at[0, 0, 0].set(jnp.nan), a, mask)
  assert float(nans) > 0 and np.all(np.isfinite(np.asarray(g_nan)))


def test_smoothed_teacher_gives_zero_gradient_at_the_smoothed_fixed_point():
  """An auxiliary trained with label smoothing eps on a generator equal to the teacher predicts
  (1-eps) p + eps u; with smooth_teacher the gradient there is zero, without it it is not."""
  t = jax.random.normal(jax.random.key(1), (2, L, K + 1))
  mask = jnp.ones((2, L), bool)
  for smooth in (True, False):
    _, _, dist, _ = tiny_setup(aux_label_smoothing=0.1, smooth_teacher=smooth)
    q_logits = dist.smoothed_teacher_logits(t)
    g, _ = dist.cotangent(t, q_logits, mask)
    if smooth:
      np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)
    else:
      assert float(jnp.abs(g).max()) > 1e-3


def test_step_updates_trainable_only_and_ema():
  _, _, dist, state = tiny_setup(aux_updates=2, freeze=("tok_emb", "pos_emb", "out_bias"))
  step, state = dist.jit_step(state)
  before = jax.tree_util.tree_map(np.asarray, (state.gen.params, state.aux.params, state.teacher_params))
  state, metrics = step(state)
  state, metrics = step(state)
  assert int(state.step) == 2 and int(state.gen.step) == 2 and int(state.aux.step) == 4
  for k in ("gen/surrogate_loss", "gen/grad_norm", "gen/token_divergence", "gen/entropy", "aux/loss"):
    assert np.isfinite(float(metrics[k])), k
  gen0, aux0, teach0 = before
  for name in ("tok_emb", "pos_emb", "out_bias"):  # frozen in both students
    for new, old in ((state.gen.params, gen0), (state.aux.params, aux0)):
      for x, y in zip(jax.tree_util.tree_leaves(new[name]), jax.tree_util.tree_leaves(old[name])):
        np.testing.assert_array_equal(x, y)
  assert not np.allclose(state.gen.params["blocks"]["fc1"]["kernel"], gen0["blocks"]["fc1"]["kernel"])
  assert not np.allclose(state.aux.params["blocks"]["fc1"]["kernel"], aux0["blocks"]["fc1"]["kernel"])
  for x, y in zip(jax.tree_util.tree_leaves(state.teacher_params), jax.tree_util.tree_leaves(teach0)):
    np.testing.assert_array_equal(x, y)


def test_compiled_step_equals_jitted_step_and_checks_memory():
  _, _, dist, state = tiny_setup(aux_updates=2)
  host = jax.tree_util.tree_map(np.asarray, state)
  compiled, placed = dist.compile_step(state, bytes_limit=None)
  s1, m1 = compiled(placed)
  fn, placed2 = dist.jit_step(jax.tree_util.tree_map(jnp.asarray, host))
  s2, m2 = fn(placed2)
  for x, y in zip(jax.tree_util.tree_leaves(s1.gen.params), jax.tree_util.tree_leaves(s2.gen.params)):
    np.testing.assert_array_equal(x, y)
  assert float(m1["aux/loss"]) == float(m2["aux/loss"])
  need = memory.check_fits(compiled, None)
  assert need > sum(x.nbytes for x in jax.tree_util.tree_leaves(s1.gen.params))  # at least the state
  assert memory.check_fits(compiled, need) == need  # exactly at the limit still fits
  with pytest.raises(ValueError, match=r"needs about .* GB per device.*config.model.remat=full"):
    memory.check_fits(compiled, need - 1)
  with pytest.raises(ValueError, match="remat=full"):
    dist.compile_step(jax.tree_util.tree_map(jnp.asarray, host), bytes_limit=1024)


def test_estimated_bytes_known_answer():
  class Analysis:
    argument_size_in_bytes, output_size_in_bytes, alias_size_in_bytes, temp_size_in_bytes = 100, 90, 80, 7
  assert memory.estimated_bytes(Analysis()) == 100 + 90 - 80 + 7
  assert memory.estimated_bytes([Analysis()]) == 117
  assert memory.estimated_bytes(None) is None and memory.estimated_bytes(object()) is None
  assert memory.device_bytes_limit() is None  # the CPU reports no memory limit: never checked


def test_ema_warmup_rate():
  ema = {"w": jnp.zeros(())}
  out = optim.ema_update(ema, {"w": jnp.ones(())}, jnp.int32(0), 0.9999)
  assert float(out["w"]) == pytest.approx(1 - 0.1)  # rate (1+0)/(10+0) = 0.1
  out = optim.ema_update(ema, {"w": jnp.ones(())}, jnp.int32(10**7), 0.9)
  assert float(out["w"]) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides", [
    dict(guidance=2.0, guidance_schedule="linear", divergence="jeffreys", beta=-0.2, grad_input="sample",
         teacher_dropout=True, gen_dropout=True, aux_dropout=True, dmd_weight=True, aux_soft_target=True,
         r_init="random_0.4_0.8", sigma_warmup_steps=5, top_k=4, top_p=0.9, gen_temp=1.5),
])
def test_step_options_run_and_are_deterministic(overrides):
  schedule = overrides.pop("guidance_schedule", None)
  cfg, model, _, _ = tiny_setup(**overrides)
  if schedule:
    cfg.teacher.guidance_schedule = schedule
  dist = dimo.build_distiller(cfg, model)
  state = dist.init_state(maskgit.init_params(model, jax.random.key(0)), seed=1)
  step = jax.jit(dist.step)
  s1, m1 = step(state)
  s2, m2 = step(state)
  assert all(np.isfinite(float(v)) for v in m1.values())
  np.testing.assert_array_equal(s1.gen.params["blocks"]["fc1"]["kernel"], s2.gen.params["blocks"]["fc1"]["kernel"])


def test_cosine_generator_schedule_warms_up_then_decays_to_zero():
  fn = optim.make_schedule(1e-3, warmup_steps=10, kind="cosine", steps=110)
  assert float(fn(0)) == 0.0
  assert float(fn(10)) == pytest.approx(1e-3)
  assert float(fn(60)) == pytest.approx(5e-4, rel=1e-5)  # half-way down the cosine
  assert float(fn(110)) == pytest.approx(0.0, abs=1e-12)
  const = optim.make_schedule(1e-3, warmup_steps=0)
  assert const == 1e-3
  with pytest.raises(ValueError, match="gen_lr_schedule='linear'"):
    optim.make_schedule(1e-3, kind="linear")
  with pytest.raises(ValueError, match="must exceed config.distill.warmup_steps"):
    optim.make_schedule(1e-3, warmup_steps=100, kind="cosine", steps=50)


def test_cosine_schedule_stops_the_generator_at_the_end():
  _, _, dist, state = tiny_setup(gen_lr_schedule="cosine", steps=2)
  step = jax.jit(dist.step)
  state, _ = step(state)
  state, _ = step(state)
  before = jax.device_get(state.gen.params)
  state, _ = step(state)  # a step past config.distill.steps runs at lr 0: the generator stays put
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(state.gen.params))):
    np.testing.assert_array_equal(a, b)


def test_bad_settings_fail_clearly():
  with pytest.raises(ValueError, match="config.distill.normalization='mean'"):
    tiny_setup(normalization="mean")
  with pytest.raises(ValueError, match="r_init"):
    tiny_setup(r_init="sometimes")
  with pytest.raises(ValueError, match="config.distill.aux_updates"):
    tiny_setup(aux_updates=0)
  cfg = digits.get_config()
  cfg.teacher.guidance = 2.0
  bert = maskgit.BertMaskTransformer(codebook_size=K, seq_len=L, num_classes=C, width=16, depth=1, heads=2, mlp_dim=32)
  with pytest.raises(ValueError, match="guidance=2.0 needs a null class"):
    dimo.build_distiller(cfg, bert)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from configs import digits
    from dimo_jax.core import sharding
    from dimo_jax.method import dimo
    from dimo_jax.networks import maskgit
    assert jax.device_count() == 8
    cfg = digits.get_config()
    cfg.distill.batch_size = 16
    cfg.distill.warmup_steps = 0
    # Adam turns float noise in exactly-zero gradients (the attention key bias) into full-size
    # steps; a larger eps keeps the comparison about the real gradients.
    cfg.distill.eps = 1e-3
    cfg.teacher.guidance = 2.0
    # OPTIONS
    model = maskgit.MaskTransformer(codebook_size=8, seq_len=6, num_classes=3, width=16, depth=2, heads=2, mlp_dim=32)
    params = maskgit.init_params(model, jax.random.key(0))
    results = []
    for mesh in (None, sharding.make_mesh(data=4, fsdp=2)):
      dist = dimo.build_distiller(cfg, model)
      step, state = dist.jit_step(dist.init_state(params, seed=1), mesh, min_shard_size=1)
      for _ in range(3):
        state, metrics = step(state)
      if mesh is not None:
        spec = state.gen.params["blocks"]["fc1"]["kernel"].sharding.spec
        assert "fsdp" in tuple(spec), spec
      results.append((jax.device_get(state.gen.params), jax.device_get(state.aux.params), float(metrics["gen/grad_norm"])))
    (g1, a1, n1), (g2, a2, n2) = results
    for x, y in zip(jax.tree_util.tree_leaves((g1, a1)), jax.tree_util.tree_leaves((g2, a2))):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
    assert abs(n1 - n2) < 1e-3 * max(1.0, n1)
    print("SHARDED_OK")
""")


@pytest.mark.parametrize("options", ["", "cfg.distill.generator_steps = 2"], ids=["one_step", "two_steps"])
def test_sharded_step_matches_single_device(options):
  out = run_on_simulated_devices(SHARDED_SCRIPT.replace("# OPTIONS", options), timeout=600)
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
