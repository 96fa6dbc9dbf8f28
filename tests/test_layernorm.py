"""Every LayerNorm of the MaskGIT transformers against a float64 reference, at an offset of 100x
the spread (where the one-pass variance E[x^2] - E[x]^2 loses precision)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.networks import maskgit

WIDTH, DEPTH = 64, 2


def _layer_norm_errors(arch: str):
  """(name, relative error) for each LayerNorm the model calls, applied to an offset input."""
  model = maskgit.build_model({"arch": arch, "width": WIDTH, "depth": DEPTH, "heads": 4, "scan": False},
                              codebook_size=16, seq_len=8, num_classes=3)
  params = maskgit.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  x = (100.0 + rng.normal(0.0, 1.0, (2, 9, WIDTH))).astype(np.float32)
  found = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.LayerNorm) and context.method_name == "__call__":
      # the model's LayerNorm (configuration and parameters), applied to x after the model ran
      found.append((module.name, module.clone(parent=None), module.variables["params"]))
    return next_fun(*args, **kwargs)

  tokens = np.zeros((2, 8), np.int32)
  labels = np.zeros((2,), np.int32)
  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, tokens, labels)
  xd = x.astype(np.float64)
  mean = xd.mean(-1, keepdims=True)
  var = np.square(xd - mean).mean(-1, keepdims=True)
  errors = []
  for name, module, p in found:
    got = np.asarray(module.apply({"params": p}, jnp.asarray(x)), np.float64)
    want = (xd - mean) / np.sqrt(var + module.epsilon) * np.asarray(p["scale"], np.float64) + \
        np.asarray(p["bias"], np.float64)
    errors.append((name, float(np.abs(got - want).max() / np.abs(want).max())))
  return errors


@pytest.mark.parametrize("arch,count", [("preln", 4 + 2 * DEPTH), ("bert", 2 + 2 * DEPTH)])
def test_layer_norms_are_exact_at_an_offset(arch, count):
  errors = _layer_norm_errors(arch)
  assert len(errors) == count, errors
  worst = max(e for _, e in errors)
  assert worst <= 2e-5, errors
