"""The text-conditioned Di[M]O step (a condition pytree per example, guidance against the negative
prompt) on a tiny Meissonic transformer."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_simulated_devices

from configs import captioned_digits
from dimo_jax.core import divergences, masking
from dimo_jax.method import dimo
from dimo_jax.networks import meissonic, text_conditioning

B, T = 4, 4


def tiny_text_setup(**overrides):
  cfg = captioned_digits.get_config()
  cfg.distill.batch_size = B
  cfg.distill.warmup_steps = 0
  cfg.distill.gen_lr = 1e-2
  cfg.distill.aux_lr = 1e-2
  cfg.distill.aux_updates = 2
  cfg.teacher.guidance = overrides.pop("guidance", 4.0)
  for k, v in overrides.items():
    cfg.distill[k] = v
  # mask id 39 lies above the codebook's end (32), as Meissonic's 8255 above 8192.
  model = text_conditioning.build(meissonic.MeissonicConfig.tiny(num_layers=1, num_single_layers=1), text_len=T)
  params = perturbed(model.init_params(jax.random.key(0)))
  spec = {"text": jax.ShapeDtypeStruct((T, 24), jnp.float32), "pooled": jax.ShapeDtypeStruct((32,), jnp.float32)}
  dist = dimo.build_distiller(cfg, model, cond_spec=spec)
  return cfg, model, dist, dist.init_state(params, seed=1)


def perturbed(params, scale=0.05):
  """Parameters with noise added: AdaLN-Zero starts every block (and so the condition's effect) at zero."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [a + scale * jax.random.normal(k, a.shape, a.dtype)
                                             for a, k in zip(leaves, keys)])


def random_cond(key, lead):
  k1, k2 = jax.random.split(key)
  return {"text": jax.random.normal(k1, (*lead, T, 24)), "pooled": jax.random.normal(k2, (*lead, 32))}


def test_text_vjp_gradient_equals_surrogate_loss_gradient():
  """One vjp with cotangent g/B equals jax.grad of 0.5 * sum((z - sg(z - g))^2) / B, with the
  teacher guided (w = 4) against the negative prompt's condition."""
  _, model, dist, state = tiny_text_setup()
  key = jax.random.key(3)
  cond, neg = random_cond(key, (B,)), random_cond(jax.random.key(4), (1,))

  @jax.jit
  def both(state):
    labels, x_init = dist.draw_inputs(key, B, cond)
    fwd = lambda p: dist.gen_logits(p, x_init, labels, key, 0.1)
    z, vjp_fn = jax.vjp(fwd, state.gen.params)
    x_t, mask, ratio = masking.forward_mask(key, dist.sample_tokens(key, z), model.mask_id, "arccos")
    t_logits = dist.teacher_logits(state.teacher_params, x_t, labels, ratio, key, neg)
    a_logits = dist.aux_logits(jax.tree_util.tree_map(lambda a: a * 1.1, state.aux.params), x_t, labels, key, neg)
    g_scaled, nan_count = dist.cotangent(t_logits, a_logits, mask)
    (g_vjp,) = vjp_fn(g_scaled)
    # The config's divergence (captioned digits: Jeffreys, beta 0.75), in closed form.
    assert (dist.s.divergence, dist.s.beta) == ("jeffreys", 0.75)
    g_raw = jnp.where(mask[..., None],
                      divergences.token_gradient(dist.s.divergence, t_logits, a_logits, dist.s.beta), 0.0)

    def surrogate(p):
      zz = fwd(p)
      return 0.5 * jnp.sum(jnp.square(zz - jax.lax.stop_gradient(zz - g_raw))) / B

    return x_init, z, nan_count, g_raw, g_vjp, jax.grad(surrogate)(state.gen.params)

  x_init, z, nan_count, g_raw, g_vjp, g_auto = both(state)
  assert int(jnp.sum(x_init == model.mask_id)) > 0 and int(jnp.sum(x_init == model.codebook_size)) == 0
  assert z.shape == (B, model.seq_len, model.codebook_size + 1)
  assert int(nan_count) == 0
  assert float(jnp.max(jnp.abs(g_raw[..., -1]))) == 0.0  # the mask column never gets a gradient
  for a, b in zip(jax.tree_util.tree_leaves(g_vjp), jax.tree_util.tree_leaves(g_auto)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(g_vjp))) > 0


def test_guidance_against_the_negative_prompt():
  """Teacher logits = u + w (c - u) with u the negative prompt's logits (one batched call);
  the auxiliary has its own weight (1: the conditional call alone)."""
  _, model, dist, state = tiny_text_setup(guidance=4.0, aux_guidance=1.0)
  key = jax.random.key(5)
  cond, neg = random_cond(key, (B,)), random_cond(jax.random.key(6), (1,))
  x_t = masking.forward_mask(key, jax.random.randint(key, (B, model.seq_len), 0, model.codebook_size),
                             model.mask_id, "arccos")[0]
  apply = jax.jit(lambda p, c: model.apply({"params": p}, x_t, c))
  negb = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (B, *a.shape[1:])), neg)
  c, u = apply(state.teacher_params, cond), apply(state.teacher_params, negb)
  got = jax.jit(lambda p: dist.teacher_logits(p, x_t, cond, jnp.zeros((B,)), key, neg))(state.teacher_params)
  k = model.codebook_size
  np.testing.assert_allclose(got[..., :k], (u + 4.0 * (c - u))[..., :k], rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs((got - c)[..., :k]))) > 1e-3  # guidance changes the teacher
  aux = jax.jit(lambda d, p: d.aux_logits(p, x_t, cond, key, neg), static_argnums=0)
  np.testing.assert_allclose(aux(dist, state.aux.params), c, rtol=1e-5, atol=1e-5)
  _, _, dist2, _ = tiny_text_setup(guidance=4.0, aux_guidance=2.0)
  got_aux = aux(dist2, state.aux.params)
  np.testing.assert_allclose(got_aux[..., :k], (u + 2.0 * (c - u))[..., :k], rtol=1e-4, atol=1e-4)


def test_text_step_trains_keeps_frozen_groups_and_is_finite():
  _, model, dist, state = tiny_text_setup(freeze=("embed", "mlm_layer"))
  step, state = dist.jit_step(state)
  frozen0 = jax.device_get(state.gen.params["embed"])
  blocks0 = jax.device_get(state.gen.params["transformer_blocks"])
  ema0 = jax.device_get(state.ema_params)
  for i in range(2):
    conds = {"gen": random_cond(jax.random.key(10 + i), (B,)), "aux": random_cond(jax.random.key(20 + i), (2, B)),
             "neg": random_cond(jax.random.key(30), (1,))}
    state, metrics = step(state, dist.place_conditions(conds))
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  for a, b in zip(jax.tree_util.tree_leaves(frozen0), jax.tree_util.tree_leaves(state.gen.params["embed"])):
    np.testing.assert_array_equal(a, b)
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(blocks0), jax.tree_util.tree_leaves(state.gen.params["transformer_blocks"]))]
  assert max(moved) > 0
  assert any(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > 0 for a, b in
             zip(jax.tree_util.tree_leaves(ema0), jax.tree_util.tree_leaves(state.ema_params)))
  assert int(state.step) == 2


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from configs import captioned_digits
    from dimo_jax.core import sharding
    from dimo_jax.method import dimo
    from dimo_jax.networks import meissonic, text_conditioning
    assert jax.device_count() == 8
    cfg = captioned_digits.get_config()
    cfg.distill.batch_size = 8
    cfg.distill.aux_updates = 2
    cfg.distill.warmup_steps = 0
    cfg.distill.eps = 1e-3  # keeps Adam's first steps about the real gradients, not float noise
    cfg.distill.freeze = ("embed", "mlm_layer")
    cfg.teacher.guidance = 4.0
    model = text_conditioning.build(meissonic.MeissonicConfig.tiny(num_layers=1, num_single_layers=1), text_len=4)
    params = model.init_params(jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(params)
    r = np.random.default_rng(0)
    params = jax.tree_util.tree_unflatten(tree, [a + 0.05 * r.normal(size=a.shape).astype(np.float32) for a in leaves])
    spec = {"text": jax.ShapeDtypeStruct((4, 24), jnp.float32), "pooled": jax.ShapeDtypeStruct((32,), jnp.float32)}
    def cond(seed, lead):
      r = np.random.default_rng(seed)
      return {"text": r.normal(size=(*lead, 4, 24)).astype(np.float32),
              "pooled": r.normal(size=(*lead, 32)).astype(np.float32)}
    results = []
    for mesh in (None, sharding.make_mesh(data=4, fsdp=2)):
      dist = dimo.build_distiller(cfg, model, cond_spec=spec)
      step, state = dist.jit_step(dist.init_state(params, seed=1), mesh, min_shard_size=1)
      for i in range(3):
        conds = {"gen": cond(i, (8,)), "aux": cond(10 + i, (2, 8)), "neg": cond(99, (1,))}
        state, metrics = step(state, dist.place_conditions(conds))
      if mesh is not None:
        spec_p = state.gen.params["transformer_blocks"]["ff"]["fc1"]["kernel"].sharding.spec
        assert "fsdp" in tuple(spec_p), spec_p
        mu = [l for l in jax.tree_util.tree_leaves(state.aux.opt_state) if l.ndim == 4]
        assert any("fsdp" in tuple(l.sharding.spec) for l in mu)
      results.append((jax.device_get(state.gen.params), jax.device_get(state.aux.params), float(metrics["gen/grad_norm"])))
    (g1, a1, n1), (g2, a2, n2) = results
    for x, y in zip(jax.tree_util.tree_leaves((g1, a1)), jax.tree_util.tree_leaves((g2, a2))):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)
    assert abs(n1 - n2) < 1e-3 * max(1.0, n1)
    print("SHARDED_OK")
""")


def test_sharded_text_step_matches_single_device():
  out = run_on_simulated_devices(SHARDED_SCRIPT, timeout=400)
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]


def test_step_that_cannot_fit_is_refused_before_anything_is_allocated():
  _, _, dist, _ = tiny_text_setup()
  params = jax.eval_shape(lambda: dist.model.init_params(jax.random.key(0)))
  shapes = jax.eval_shape(lambda p: dist.init_state(p, 1), params)
  with pytest.raises(ValueError, match="needs about .* GB per device"):
    dist.check_fits_abstract(shapes, bytes_limit=1000)


def test_meissonic_distill_refuses_bad_prompt_files(tmp_path):
  from configs import meissonic as meissonic_config  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import distill  # pylint: disable=import-outside-toplevel
  cfg = meissonic_config.get_config()
  cfg.mode = "distill"
  with pytest.raises(ValueError, match="config.distill.prompts is empty"):
    distill.train_distill(cfg, str(tmp_path / "w"))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n   \n")
  cfg.distill.prompts = str(empty)
  with pytest.raises(ValueError, match="the prompt file is empty"):
    distill.train_distill(cfg, str(tmp_path / "w"))
  long = tmp_path / "long.txt"
  long.write_text("a cat\n" + "x" * 1001 + "\n")
  cfg.distill.prompts = str(long)
  with pytest.raises(ValueError, match="line 2: the prompt has 1001 characters"):
    distill.train_distill(cfg, str(tmp_path / "w"))
