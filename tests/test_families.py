"""The family registry: ``config.family`` picks the family; a missing or unknown name is refused."""
import ml_collections
import pytest

from dimo_jax.families import base
from dimo_jax.storage.checkpoints import UserError


def test_an_unknown_family_lists_the_known_ones_and_the_flag():
  with pytest.raises(UserError) as e:
    base.get_family(ml_collections.ConfigDict({"family": "llada"}))
  msg = str(e.value)
  assert "'llada'" in msg and "--config.family=" in msg
  assert all(name in msg for name in base.FAMILIES)


def test_a_config_without_family_names_the_key():
  with pytest.raises(UserError, match="config.family"):
    base.get_family(ml_collections.ConfigDict({"mode": "distill"}))


def test_class_labels_negative_is_the_null_class():
  src = base.ClassLabels(10)
  assert src.spec is None and src.step_conditions(0, 3, 4, 2) is None
  assert src.negative().tolist() == [10]


def test_every_family_names_registered_evaluators():
  from dimo_jax.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  for name in base.FAMILIES:
    family = base.get_family({"family": name})
    assert family.evaluators, name
    for evaluator in family.evaluators:
      assert evaluator in evaluators.EVALUATORS, (name, evaluator)


def test_meissonic_refuses_a_step_that_cannot_fit_before_any_network_runs(tmp_path, monkeypatch):
  """The memory refusal of ``mode=distill`` comes before the CLIP tower encodes a prompt (the
  negative prompt, a text cache): the encoder is patched to fail, and the refusal is what is seen."""
  import family_runs as runs  # pylint: disable=import-outside-toplevel
  from dimo_jax.evaluation import text_to_image  # pylint: disable=import-outside-toplevel
  from dimo_jax.method import dimo  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import distill  # pylint: disable=import-outside-toplevel
  c = runs.meissonic_cfg(str(tmp_path), "distill", steps=1)
  c.distill.text_cache = str(tmp_path / "cache.npz")

  def encoder_runs(*args, **kwargs):
    raise AssertionError("the text encoder ran before the memory check")
  monkeypatch.setattr(text_to_image, "encode_prompts", encoder_runs)
  monkeypatch.setattr(dimo, "device_bytes_limit", lambda: 1000)
  with pytest.raises(ValueError, match="the distillation step needs about"):
    distill.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "cache.npz").exists()
