import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dimo_jax.storage import checkpoints


@flax.struct.dataclass
class State:
  step: jnp.ndarray
  params: dict
  opt_state: object
  ema_params: dict
  rng: jnp.ndarray
  typed_key: jnp.ndarray


def _state(seed=0, steps=3):
  k = jax.random.PRNGKey(seed)
  params = {"dense": {"kernel": jax.random.normal(k, (4, 3)), "bias": jnp.zeros(3)},
            "emb": jax.random.normal(jax.random.fold_in(k, 1), (5, 2), jnp.bfloat16)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  opt = tx.init(params)
  for i in range(steps):  # non-trivial optimizer state
    g = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * (i + 1), params)
    upd, opt = tx.update(g, opt, params)
    params = optax.apply_updates(params, upd)
  return State(step=jnp.asarray(steps, jnp.int32), params=params, opt_state=opt,
               ema_params=jax.tree_util.tree_map(lambda p: p * 0.5, params),
               rng=jax.random.PRNGKey(seed + 7), typed_key=jax.random.key(seed + 11))


def _assert_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32) if x.dtype == jnp.bfloat16 else np.asarray(x),
                                  np.asarray(y, np.float32) if y.dtype == jnp.bfloat16 else np.asarray(y))


def test_roundtrip_exact(tmp_path):
  state = _state()
  with checkpoints.Checkpointer(tmp_path / "ck", max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state)
    assert ckpt.latest_step() == 3
    target = _state(seed=5, steps=1)  # different values, same structure
    restored = ckpt.restore(3, target)
  assert isinstance(restored, State)
  _assert_equal(restored, state)
  # The restored PRNG keys draw the same numbers.
  np.testing.assert_array_equal(jax.random.uniform(restored.typed_key, (3,)), jax.random.uniform(state.typed_key, (3,)))
  np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)), jax.random.uniform(state.rng, (3,)))


def test_interval_max_to_keep_and_latest(tmp_path):
  state = _state()
  ckpt = checkpoints.Checkpointer(tmp_path / "ck", max_to_keep=2, save_interval=10)
  saved = [s for s in range(1, 41) if ckpt.save(s, state.replace(step=jnp.int32(s)))]
  assert saved == [10, 20, 30, 40]
  assert ckpt.save(41, state, force=True)
  assert not ckpt.save(41, state, force=True)  # already there
  assert ckpt.latest_step() == 41
  assert ckpt.all_steps() == [40, 41]
  assert int(ckpt.restore(40, state).step) == 40
  assert int(ckpt.restore(None, state).step) == 3  # step 41 held the original state
  with pytest.raises(FileNotFoundError, match="step 10"):
    ckpt.restore(10, state)
  ckpt.close()
  # A new manager on the same folder sees the same steps.
  again = checkpoints.Checkpointer(tmp_path / "ck")
  assert again.latest_step() == 41
  again.close()


def test_restore_mismatch_is_clear(tmp_path):
  with checkpoints.Checkpointer(tmp_path / "ck") as ckpt:
    ckpt.save(1, {"params": {"w": jnp.ones(3)}, "step": jnp.int32(1)}, force=True)
    with pytest.raises(ValueError, match="holds entries"):
      ckpt.restore(1, {"params": {"w": jnp.ones(3)}, "other": {"x": jnp.ones(2)}, "step": jnp.int32(0)})
    with pytest.raises(ValueError, match="does not match"):
      ckpt.restore(1, {"params": {"v": jnp.ones(3)}, "step": jnp.int32(0)})


def test_load_params_and_config(tmp_path):
  workdir = tmp_path / "run"
  state = _state()
  with checkpoints.Checkpointer(checkpoints.checkpoint_dir(workdir)) as ckpt:
    ckpt.save(2, state.replace(step=jnp.int32(2)), force=True)
    ckpt.save(3, state, force=True)
  cfg = {"model": {"width": 32}, "dataset": {"vocab_size": 17, "image_shape": (8, 8)}}
  path = checkpoints.write_config(workdir, cfg)
  assert path == os.path.join(workdir, "config.json")
  assert not [f for f in os.listdir(workdir) if f.startswith(".tmp_")]
  params, ema, loaded_cfg = checkpoints.load_params(workdir)
  _assert_equal(params, state.params)
  _assert_equal(ema, state.ema_params)
  assert loaded_cfg["model"]["width"] == 32 and loaded_cfg["dataset"]["image_shape"] == [8, 8]
  # The checkpoints folder itself works too, and a chosen step.
  p2, _, c2 = checkpoints.load_params(workdir / "checkpoints", step=2)
  _assert_equal(p2, state.params)
  assert c2 == loaded_cfg


def test_save_params_without_ema(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  checkpoints.save_params(tmp_path / "conv", params, {"model": {"arch": "preln"}})
  p, ema, cfg = checkpoints.load_params(tmp_path / "conv")
  np.testing.assert_array_equal(p["w"], params["w"])
  assert ema is None and cfg == {"model": {"arch": "preln"}}
  assert json.load(open(tmp_path / "conv" / "config.json")) == cfg


def test_missing_checkpoint_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*mode=teacher"):
    checkpoints.load_params(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"no checkpoint found in .*empty.*mode=teacher"):
    checkpoints.load_params(tmp_path / "empty")
  with checkpoints.Checkpointer(tmp_path / "ck2") as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
      ckpt.restore(None, {"params": {"w": jnp.ones(2)}})
  assert checkpoints.read_config(tmp_path / "empty") is None
  (tmp_path / "empty" / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json"):
    checkpoints.read_config(tmp_path / "empty")
