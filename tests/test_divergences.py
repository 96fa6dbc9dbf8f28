import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.core import divergences


def logits_pair(seed=0, shape=(3, 5, 11), scale=3.0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return scale * jax.random.normal(k1, shape), scale * jax.random.normal(k2, shape)


def test_kl_known_answer():
  p = jnp.log(jnp.array([0.5, 0.25, 0.25]))
  q = jnp.log(jnp.array([0.25, 0.5, 0.25]))
  expected = 0.5 * np.log(2) + 0.25 * np.log(0.5)
  assert float(divergences.forward_kl(p, q)) == pytest.approx(expected, rel=1e-6)
  assert float(divergences.reverse_kl(p, q)) == pytest.approx(0.25 * np.log(0.5) + 0.5 * np.log(2), rel=1e-6)
  assert float(divergences.forward_kl(p, p)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.0), ("rkl", 0.0), ("jeffreys", -0.2), ("jeffreys", 0.5),
                                       ("jeffreys", 1.0)])
def test_closed_form_equals_autodiff(kind, beta):
  p, z = logits_pair(1)
  closed = divergences.token_gradient(kind, p, z, beta)
  auto = jax.grad(lambda zz: jnp.sum(divergences.divergence(kind, p, zz, beta)))(z)
  np.testing.assert_allclose(np.asarray(closed), np.asarray(auto), atol=2e-6)


def test_jeffreys_beta_zero_is_forward_kl():
  p, z = logits_pair(2)
  np.testing.assert_allclose(divergences.token_gradient("jeffreys", p, z, 0.0), divergences.token_gradient("fkl", p, z), atol=1e-7)
  np.testing.assert_allclose(divergences.token_gradient("jeffreys", p, z, 1.0), divergences.token_gradient("rkl", p, z), atol=1e-6)


@pytest.mark.parametrize("kind", ["tv", "js", "hellinger"])
def test_f_divergences_autodiff_and_properties(kind):
  p, z = logits_pair(3)
  g = divergences.token_gradient(kind, p, z)
  assert g.shape == z.shape and np.all(np.isfinite(np.asarray(g)))
  # Gradients w.r.t. logits sum to zero over the vocabulary (softmax shift invariance).
  np.testing.assert_allclose(np.asarray(g.sum(-1)), 0.0, atol=1e-5)
  # Zero divergence and (for smooth ones) zero gradient when the distributions agree.
  assert np.allclose(divergences.divergence(kind, p, p), 0.0, atol=1e-6)
  if kind != "tv":
    np.testing.assert_allclose(divergences.token_gradient(kind, p, p), 0.0, atol=1e-6)
  # A small step against the gradient lowers the divergence.
  d0 = jnp.sum(divergences.divergence(kind, p, z))
  d1 = jnp.sum(divergences.divergence(kind, p, z - 0.05 * g))
  assert float(d1) < float(d0)


def test_gradients_sum_to_zero_and_shift_invariant():
  p, z = logits_pair(4)
  for kind in ("fkl", "rkl"):
    g = divergences.token_gradient(kind, p, z)
    np.testing.assert_allclose(np.asarray(g.sum(-1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(divergences.token_gradient(kind, p + 7.0, z - 3.0), g, atol=1e-5)


def test_unknown_divergence():
  p, z = logits_pair(5)
  with pytest.raises(ValueError, match="unknown divergence 'wasserstein'"):
    divergences.token_gradient("wasserstein", p, z)


def test_entropy():
  assert float(divergences.entropy(jnp.zeros(8))) == pytest.approx(np.log(8), rel=1e-6)


class DivergenceVariantsTest(chex.TestCase):
  """The token divergences and their closed-form gradients give the same trees with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_token_gradient_jit_and_eager_agree_with_autodiff(self):
    p, z = logits_pair(6)
    for kind, beta in (("fkl", 0.0), ("rkl", 0.0), ("jeffreys", 0.75), ("js", 0.0)):
      grad = self.variant(functools.partial(divergences.token_gradient, kind))(p, z, jnp.float32(beta))
      chex.assert_shape(grad, z.shape)
      chex.assert_tree_all_finite(grad)
      auto = jax.grad(lambda zz, kind=kind, beta=beta: jnp.sum(divergences.divergence(kind, p, zz, beta)))(z)
      chex.assert_trees_all_close(grad, auto, atol=2e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_divergences_per_token_nonnegative_zero_at_equality(self):
    p, q = logits_pair(7)
    for kind in ("fkl", "rkl", "tv", "js", "hellinger"):
      fn = self.variant(functools.partial(divergences.divergence, kind))
      d = fn(p, q)
      chex.assert_shape(d, p.shape[:-1])
      chex.assert_tree_all_finite(d)
      assert float(jnp.min(d)) >= -1e-6, kind
      chex.assert_trees_all_close(fn(p, p), jnp.zeros(p.shape[:-1]), atol=1e-6)
