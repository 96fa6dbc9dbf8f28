"""The text teacher in the token networks' convention: method.mdm trains it to a closed-form loss,
method.dimo distils it, the causal reference LM sees no future."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dimo_jax.core import categorical, masking
from dimo_jax.method import dimo, mdm
from dimo_jax.networks import causal_lm, conditioning, text_mdm

P = np.array([0.4, 0.3, 0.15, 0.1, 0.05])  # i.i.d. tokens: the best masked loss is the entropy H(P)
H = float(-np.sum(P * np.log(P)))


def _model(**kw):
  cfg = ml_collections.ConfigDict(dict(width=32, depth=2, heads=2, mlp_dim=64, **kw))
  return text_mdm.build_model(cfg, vocab_size=5, seq_len=8)


def _train(model, steps=150, seed=0):
  settings = mdm.TeacherSettings(steps=steps, lr=3e-3, warmup_steps=20, loss_on="masked", ema_decay=0.9)
  tx = settings.optimizer()
  step = jax.jit(mdm.make_train_step(model, tx, mask_id=model.mask_id, num_classes=0, loss_on="masked",
                                     schedule="arccos", ema_decay=0.9))
  state = mdm.init_train_state(model, tx, seed)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    tokens = rng.choice(5, size=(64, 8), p=P).astype(np.int32)
    state, metrics = step(state, tokens, np.zeros(64, np.int32))
  return state, metrics


def test_initial_loss_is_log_vocab_and_trained_loss_reaches_the_entropy():
  model = _model()
  tokens = np.random.default_rng(5).choice(5, size=(512, 8), p=P).astype(np.int32)
  params = model.init_params(jax.random.key(0))
  apply_fn = conditioning.make_apply_fn(model)
  kw = dict(mask_id=model.mask_id, null_label=0, key=jax.random.key(1), loss_on="masked")
  init_loss = mdm.evaluate_val_loss(apply_fn, params, tokens, None, **kw)["val_loss"]
  np.testing.assert_allclose(init_loss, np.log(5), rtol=1e-5)  # zero-initialised head, mask column excluded
  state, _ = _train(model)
  loss = mdm.evaluate_val_loss(apply_fn, state.ema_params, tokens, None, **kw)["val_loss"]
  assert H * 0.97 < loss < H * 1.03, (loss, H)
  # the masked-diffusion bound per token on i.i.d. data is the entropy too
  bound = mdm.nll_bound(apply_fn, state.ema_params, tokens, mask_id=model.mask_id, draws=2)
  assert abs(bound.mean() - H) < 0.05 * H


def test_scanned_and_unrolled_layers_compute_the_same_function():
  scanned, unrolled = _model(), _model(scan=False)
  params = scanned.init_params(jax.random.key(3))
  params = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.ones_like(a), params)  # a non-zero head
  tokens = jax.random.randint(jax.random.key(4), (3, 8), 0, 6)
  a = scanned.apply({"params": params}, tokens, jnp.zeros(3, jnp.int32))
  from dimo_jax.networks import maskgit  # pylint: disable=import-outside-toplevel
  b = unrolled.apply({"params": maskgit.unstack_layers(params, 2)}, tokens, jnp.zeros(3, jnp.int32))
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert a.shape == (3, 8, 6) and np.all(np.asarray(a[..., 5]) == text_mdm.MASK_LOGIT)


def test_dimo_distils_the_text_teacher_unchanged():
  model = _model()
  state, _ = _train(model, steps=60)
  from configs import text  # pylint: disable=import-outside-toplevel
  config = text.get_config()
  config.distill.batch_size = 16
  config.distill.aux_updates = 2
  distiller = dimo.build_distiller(config, model)
  dstate = distiller.init_state(state.ema_params, seed=0)
  step, dstate = distiller.jit_step(dstate)
  before = jax.tree_util.tree_map(np.asarray, dstate.gen.params)
  for _ in range(3):
    dstate, metrics = step(dstate)
  assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["nonfinite"]) == 0
  changed = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), dstate.gen.params, before)
  assert max(jax.tree_util.tree_leaves(changed)) > 0
  with categorical.float64_mode():
    x = categorical.one_step_sample(model, dstate.ema_params, jax.random.key(0), np.zeros(32, np.int32),
                                    r_init=0.6, sigma=0.1)
  assert x.shape == (32, 8) and int(x.max()) < 5


def test_causal_lm_sees_no_future_and_trains_on_next_tokens():
  lm = causal_lm.CausalLM(vocab_size=7, seq_len=6, width=16, depth=1, heads=2, mlp_dim=32)
  params = lm.init_params(jax.random.key(0))
  x = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
  y = x.at[:, 3].set((x[:, 3] + 1) % 7)
  a, b = lm.apply({"params": params}, x), lm.apply({"params": params}, y)
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert float(jnp.abs(a[:, 3:] - b[:, 3:]).max()) > 1e-4
