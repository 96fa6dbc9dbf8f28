"""``networks.conditioning.make_apply_fn``: the one adapter from a network to the samplers' ``apply_fn``."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.networks import conditioning, meissonic, text_conditioning


@dataclasses.dataclass(frozen=True)
class _Recorder:
  """A stand-in network: logits ``[B, L, 5]`` that encode the call, and the keywords it was given."""
  calls: list = dataclasses.field(default_factory=list, hash=False, compare=False)

  def apply(self, variables, tokens, cond, **kwargs):
    self.calls.append(kwargs)
    b, l = tokens.shape
    return jnp.broadcast_to(jnp.arange(5.0) + variables["params"], (b, l, 5))


def test_label_convention_is_eval_mode():
  model = _Recorder()
  fn = conditioning.make_apply_fn(model)
  out = fn(1.0, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32))
  assert out.shape == (2, 3, 5) and float(out[0, 0, 0]) == 1.0
  assert model.calls == [{"deterministic": True}]
  assert conditioning.make_apply_fn(model) is fn  # cached: jit-compiled users reuse their programs
  with pytest.raises(ValueError, match="conditions=True only"):
    conditioning.make_apply_fn(model, num_logits=4)


def test_condition_convention_feeds_or_drops_the_timestep():
  model = _Recorder()
  tokens, key = jnp.zeros((2, 3), jnp.int32), jax.random.key(0)
  fed = conditioning.make_apply_fn(model, conditions=True)
  assert fed(0.0, tokens, {}, 0.25).shape == (2, 3, 5)
  assert model.calls[-1] == {"timestep": 0.25, "noise_sigma": 0.0, "rngs": {}}
  fed(0.0, tokens, {}, 0.5, noise_sigma=0.1, rng=key)
  assert model.calls[-1]["rngs"] == {"noise": key} and model.calls[-1]["noise_sigma"] == 0.1
  free = conditioning.make_apply_fn(model, conditions=True, feed_timestep=False, num_logits=4)
  out = free(0.0, tokens, {}, 0.75)
  assert "timestep" not in model.calls[-1]
  np.testing.assert_array_equal(np.asarray(out[0, 0]), [0.0, 1.0, 2.0, 3.0])


def test_text_token_model_sampler_apply_is_the_network_at_its_timestep():
  """A ``TextTokenModel``'s sampler ``apply_fn`` ignores the sampler's step, runs the transformer at
  timestep 0 and returns the codebook's logits without the mask column."""
  cfg = meissonic.MeissonicConfig.tiny(num_layers=1, num_single_layers=1)
  model = text_conditioning.build(cfg, text_len=4)
  params = model.init_params(jax.random.key(0))
  rng = np.random.default_rng(0)
  cond = {"text": jnp.asarray(rng.normal(size=(2, 4, cfg.text_dim)), jnp.float32),
          "pooled": jnp.asarray(rng.normal(size=(2, cfg.pooled_dim)), jnp.float32),
          "micro": jnp.asarray(meissonic.DEFAULT_MICRO_CONDS, jnp.float32)[None].repeat(2, 0)}
  tokens = jnp.asarray(rng.integers(0, cfg.codebook_size, size=(2, cfg.seq_len)), jnp.int32)
  fn = model.sampler_apply_fn()
  assert fn is model.sampler_apply_fn()
  got = jax.jit(fn)(params, tokens, cond, jnp.float32(7.0))
  want = jax.jit(lambda p: model.net.apply({"params": p}, tokens, cond, timestep=0.0))(params)
  assert got.shape == (2, cfg.seq_len, cfg.codebook_size)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
