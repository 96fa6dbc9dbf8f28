import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.core import losses

B, L, K = 3, 7, 5


def _data(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, L, K + 1)).astype(np.float32)
  targets = rng.integers(0, K, size=(B, L)).astype(np.int32)
  mask = rng.random((B, L)) < 0.5
  mask[:, 0] = True
  mask[:, 1] = False
  return jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)


def _np_ce(logits, target, eps):
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum())
  q = np.zeros(K + 1)
  q[:K] = eps / K
  q[target] += 1 - eps
  return -(q * logp).sum()


@pytest.mark.parametrize("fn", ["mdm", "aux"])
def test_unmasked_positions_do_not_count(fn):
  logits, targets, mask = _data()
  noise = jnp.asarray(np.random.default_rng(1).normal(size=logits.shape) * 10, jnp.float32)
  changed = jnp.where(mask[..., None], logits, logits + noise)
  if fn == "mdm":
    f = lambda lg: losses.mdm_loss(lg, targets, mask, loss_on="masked", label_smoothing=0.1)[0]
  else:
    f = lambda lg: losses.aux_loss(lg, targets, mask, 0.1)[0]
  np.testing.assert_allclose(f(logits), f(changed), rtol=1e-6)
  # Changing a masked position does change it.
  changed_masked = logits.at[0, 0].add(3.0 * jnp.arange(K + 1, dtype=jnp.float32))
  assert abs(float(f(logits)) - float(f(changed_masked))) > 1e-3
  # Gradient is zero at unmasked positions.
  g = jax.grad(f)(logits)
  assert float(jnp.abs(jnp.where(mask[..., None], 0.0, g)).max()) == 0.0
  assert float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_known_answer_with_smoothing(eps):
  logits, targets, mask = _data(2)
  loss, metrics = losses.mdm_loss(logits, targets, mask, loss_on="masked", label_smoothing=eps)
  m = np.asarray(mask)
  ref = [_np_ce(logits[b, i], int(targets[b, i]), eps) for b in range(B) for i in range(L) if m[b, i]]
  np.testing.assert_allclose(float(loss), np.mean(ref), rtol=1e-5)
  ref_nll = [_np_ce(logits[b, i], int(targets[b, i]), 0.0) for b in range(B) for i in range(L) if m[b, i]]
  np.testing.assert_allclose(float(metrics["nll_masked"]), np.mean(ref_nll), rtol=1e-5)
  aux, _ = losses.aux_loss(logits, targets, mask, eps)
  np.testing.assert_allclose(float(aux), np.mean(ref), rtol=1e-5)


def test_smoothing_spreads_over_codes_only():
  q = losses.smoothed_targets(jnp.array([2]), K + 1, K, 0.2)
  np.testing.assert_allclose(np.asarray(q[0]), [0.04, 0.04, 0.84, 0.04, 0.04, 0.0], atol=1e-7)
  np.testing.assert_allclose(float(q.sum()), 1.0, rtol=1e-6)
  # Uniform logits over codes with the mask column at -inf-ish: smoothing does not change the loss.
  logits = jnp.zeros((1, 1, K + 1)).at[..., K].set(-1e9)
  t = jnp.zeros((1, 1), jnp.int32)
  m = jnp.ones((1, 1), bool)
  for eps in (0.0, 0.5):
    np.testing.assert_allclose(float(losses.mdm_loss(logits, t, m, label_smoothing=eps)[0]), np.log(K), rtol=1e-6)


def test_loss_on_all_differs_and_normalisation():
  logits, targets, mask = _data(3)
  masked, _ = losses.mdm_loss(logits, targets, mask, loss_on="masked")
  full, _ = losses.mdm_loss(logits, targets, mask, loss_on="all")
  assert abs(float(masked) - float(full)) > 1e-4
  ref_all = np.mean([_np_ce(logits[b, i], int(targets[b, i]), 0.0) for b in range(B) for i in range(L)])
  np.testing.assert_allclose(float(full), ref_all, rtol=1e-5)
  # Per masked token: duplicating the batch leaves both losses unchanged.
  dup = lambda a: jnp.concatenate([a, a])
  np.testing.assert_allclose(float(losses.mdm_loss(dup(logits), dup(targets), dup(mask))[0]), float(masked), rtol=1e-6)
  # loss_on='all' ignores the mask: same value with another mask.
  full2, _ = losses.mdm_loss(logits, targets, ~mask, loss_on="all")
  np.testing.assert_allclose(float(full2), float(full), rtol=1e-6)
  # A batch whose mask covers one token: loss is that token's cross-entropy (not divided by B*L).
  one = jnp.zeros((B, L), bool).at[1, 4].set(True)
  np.testing.assert_allclose(float(losses.mdm_loss(logits, targets, one)[0]),
                             _np_ce(logits[1, 4], int(targets[1, 4]), 0.0), rtol=1e-5)


def test_perfect_logits_accuracy_and_low_loss():
  _, targets, mask = _data(4)
  logits = 50.0 * jax.nn.one_hot(targets, K + 1)
  loss, metrics = losses.mdm_loss(logits, targets, mask)
  assert float(loss) < 1e-6
  assert float(metrics["acc_masked"]) == 1.0
  np.testing.assert_allclose(float(metrics["mask_fraction"]), float(np.mean(np.asarray(mask))), rtol=1e-6)


def test_aux_soft_targets():
  logits, targets, mask = _data(5)
  # One-hot soft targets equal the hard-target loss.
  hard, _ = losses.aux_loss(logits, targets, mask, 0.1)
  soft, _ = losses.aux_loss(logits, targets, mask, 0.1, soft_target_probs=jax.nn.one_hot(targets, K))
  np.testing.assert_allclose(float(soft), float(hard), rtol=1e-6)
  # A soft target p: loss = mean over masked of -sum p log softmax(logits).
  p = jax.nn.softmax(jnp.asarray(np.random.default_rng(6).normal(size=(B, L, K)), jnp.float32))
  val, _ = losses.aux_loss(logits, targets, mask, 0.0, soft_target_probs=p)
  logq = jax.nn.log_softmax(logits)[..., :K]
  ref = -(p * logq).sum(-1)
  np.testing.assert_allclose(float(val), float(ref[mask].mean()), rtol=1e-5)
  with pytest.raises(ValueError, match="soft_target_probs"):
    losses.aux_loss(logits, targets, mask, 0.0, soft_target_probs=p[..., :3])


def test_bad_inputs():
  logits, targets, mask = _data()
  with pytest.raises(ValueError, match="loss_on"):
    losses.mdm_loss(logits, targets, mask, loss_on="visible")
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.mdm_loss(logits, targets, mask, label_smoothing=1.0)
  with pytest.raises(ValueError, match="mask shape"):
    losses.mdm_loss(logits, targets, mask[:, :3])


def test_jit():
  logits, targets, mask = _data()
  f = jax.jit(lambda a, b, c: losses.mdm_loss(a, b, c, loss_on="all", label_smoothing=0.1)[0])
  np.testing.assert_allclose(float(f(logits, targets, mask)),
                             float(losses.mdm_loss(logits, targets, mask, loss_on="all", label_smoothing=0.1)[0]),
                             rtol=1e-6)


class LossVariantsTest(chex.TestCase):
  """Both losses and their metrics trees are the same with and without jit, finite, scalar."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_mdm_loss_jit_and_eager(self):
    logits, targets, mask = _data(3)
    for loss_on, eps in (("masked", 0.0), ("all", 0.1)):
      fn = functools.partial(losses.mdm_loss, loss_on=loss_on, label_smoothing=eps)
      loss, metrics = self.variant(fn)(logits, targets, mask)
      chex.assert_shape(loss, ())
      chex.assert_tree_all_finite((loss, metrics))
      chex.assert_trees_all_close((loss, metrics), fn(logits, targets, mask), rtol=1e-6)
    # Masked loss: the known answer of the NumPy cross-entropy at the masked positions.
    loss, _ = self.variant(losses.mdm_loss)(logits, targets, mask)
    want = np.mean([_np_ce(logits[b, i], targets[b, i], 0.0) for b in range(B) for i in range(L) if mask[b, i]])
    chex.assert_trees_all_close(loss, jnp.float32(want), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_aux_loss_jit_and_eager(self):
    logits, targets, mask = _data(4)
    soft = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(B, L, K)), jnp.float32))
    for kwargs in ({}, {"label_smoothing": 0.2}):
      fn = functools.partial(losses.aux_loss, **kwargs)
      out = self.variant(fn)(logits, targets, mask)
      chex.assert_shape(out[0], ())
      chex.assert_tree_all_finite(out)
      chex.assert_trees_all_close(out, fn(logits, targets, mask), rtol=1e-6)
    out = self.variant(lambda a, b, c, q: losses.aux_loss(a, b, c, soft_target_probs=q))(logits, targets, mask, soft)
    chex.assert_trees_all_close(out, losses.aux_loss(logits, targets, mask, soft_target_probs=soft), rtol=1e-6)
