"""The text family against the families interface: mode=teacher's run, the stored teacher read back
with its sizes, and decoding. Runs where ``dimo_jax.families.base`` is present."""
import numpy as np
import pytest

base = pytest.importorskip("dimo_jax.families.base")

from configs import text  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.core import sharding  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.families import text as text_family  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.storage import checkpoints  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.storage.checkpoints import UserError  # noqa: E402  pylint: disable=wrong-import-position


def _config():
  c = text.get_config()
  c.model.update(depth=1, width=32, heads=2, mlp_dim=64)
  c.data.seq_len = 16
  c.train.update(steps=3, warmup_steps=1, batch_size=8)
  return c


def test_teacher_run_trains_stores_and_reloads(tmp_path):
  fam, c = text_family.FAMILY, _config()
  run = fam.teacher_run(c, str(tmp_path), sharding.make_mesh())
  state = run.fns.init(np.int32(0))
  batches = run.batches(0)
  for _ in range(2):
    state, metrics = run.fns.step(state, *next(batches))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(run.validate(state)["val_loss"])
  checkpoints.save_params(str(tmp_path), state.params, run.run_config, ema_params=state.ema_params)
  c.teacher.checkpoint = str(tmp_path)
  loaded = fam.load_teacher(c, "")
  assert (loaded.model.codebook_size, loaded.model.seq_len, loaded.model.mask_id) == (257, 16, 257)
  assert fam.network_config(loaded, loaded.model)["text_network"]["sep_id"] == 256
  assert fam.decode_text(np.array([[72, 105, 256, 33]]), loaded.stored) == ["Hi<|sep|>!"]
  assert fam.condition_source(c, loaded).spec is None


def test_missing_teacher_names_the_command(tmp_path):
  c = _config()
  c.teacher.checkpoint = str(tmp_path / "absent")
  with pytest.raises(UserError, match="--config.mode=teacher"):
    text_family.FAMILY.load_teacher(c, "")
