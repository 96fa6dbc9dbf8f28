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
