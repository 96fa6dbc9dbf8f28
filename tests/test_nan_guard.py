"""A teacher with a NaN parameter: the Di[M]O step's guards keep the generator and every logged
metric finite and count what they zeroed in ``nonfinite``."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import digits
from dimo_jax.method import dimo
from dimo_jax.networks import maskgit

K, L, C = 8, 6, 3


def _setup():
  cfg = digits.get_config()
  cfg.distill.batch_size = 8
  cfg.distill.warmup_steps = 0
  cfg.distill.gen_lr = 1e-2
  cfg.distill.aux_lr = 1e-2
  cfg.distill.aux_updates = 2
  cfg.teacher.guidance = 2.0
  model = maskgit.MaskTransformer(codebook_size=K, seq_len=L, num_classes=C, width=16, depth=1, heads=2,
                                 mlp_dim=32)
  teacher = maskgit.init_params(model, jax.random.key(0))
  return dimo.build_distiller(cfg, model), teacher


def _all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(a)))) for a in jax.tree_util.tree_leaves(tree))


def _run(step, state, steps=3):
  out = []
  for _ in range(steps):
    state, metrics = step(state)
    out.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  return state, out


def test_nan_in_one_teacher_parameter_keeps_metrics_and_generator_finite():
  dist, teacher = _setup()
  step = jax.jit(dist.step)

  kernel = teacher["blocks"]["attn"]["qkv"]["kernel"]
  bad = {**teacher, "blocks": {**teacher["blocks"], "attn": {**teacher["blocks"]["attn"], "qkv": {
      **teacher["blocks"]["attn"]["qkv"], "kernel": kernel.at[0, 0, 0].set(jnp.nan)}}}}
  state = dist.init_state(bad, seed=1, student_params=teacher)
  state, history = _run(step, state)
  for metrics in history:
    bad_keys = [k for k, v in metrics.items() if not math.isfinite(v)]
    assert not bad_keys, f"non-finite metrics {bad_keys}: {metrics}"
  assert _all_finite(state.gen.params) and _all_finite(state.ema_params) and _all_finite(state.aux.params)
  assert int(state.step) == 3
  for metrics in history:  # every masked entry of the token gradient was NaN and zeroed
    assert metrics["nonfinite"] > 0 and metrics["nonfinite"] == metrics["gen/nan_count"]

  _, healthy = _run(step, dist.init_state(teacher, seed=1), steps=1)
  assert healthy[0]["nonfinite"] == 0.0 and healthy[0]["gen/token_divergence"] > 0.0


def test_zero_nonfinite_counts_and_zeroes():
  tree = {"a": jnp.array([1.0, jnp.nan, jnp.inf]), "b": jnp.array([[-jnp.inf, 2.0]])}
  clean, count = dimo.zero_nonfinite(tree)
  assert int(count) == 3
  np.testing.assert_array_equal(clean["a"], [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(clean["b"], [[0.0, 2.0]])
