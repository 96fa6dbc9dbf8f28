"""Every config file builds, names a known family, and holds no key that nothing reads.

A key counts as read when its leaf name is read somewhere in the package (``.name``,
``["name"]``, ``get("name"``) or is a field of a dataclass that a config section fills by name
(``DistillSettings``, ``TeacherSettings``, ``MeissonicConfig``, ``EvalSettings``)."""
import dataclasses
import glob
import importlib
import os
import re

import pytest

from dimo_jax.families import base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "base.py")))


def _leaves(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}"


def _source():
  return "\n".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(ROOT, "dimo_jax", "**", "*.py"),
                                                                       recursive=True))


def _filled_by_name():
  from dimo_jax.evaluation import settings  # pylint: disable=import-outside-toplevel
  from dimo_jax.method import dimo, mdm  # pylint: disable=import-outside-toplevel
  from dimo_jax.networks import meissonic  # pylint: disable=import-outside-toplevel
  classes = [dimo.DistillSettings, mdm.TeacherSettings, meissonic.MeissonicConfig]
  classes += [v for v in vars(settings).values() if dataclasses.is_dataclass(v) and isinstance(v, type)]
  return {f.name for c in classes for f in dataclasses.fields(c)}


def _read(name: str, source: str) -> bool:
  pattern = rf"\.{re.escape(name)}\b|\[\s*[\"']{re.escape(name)}[\"']\s*\]|get\(\s*[\"']{re.escape(name)}[\"']"
  return re.search(pattern, source) is not None


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_names_its_family_and_every_key_is_read(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  family = base.get_family(config)
  assert family.name == config.family
  source, filled = _source(), _filled_by_name()
  unread = [k for k in _leaves(config.to_dict()) if k.rsplit(".", 1)[-1] not in filled
            and not _read(k.rsplit(".", 1)[-1], source)]
  assert not unread, f"configs/{name}.py: keys nothing reads: {unread}"


def test_the_check_finds_an_unread_key():
  assert not _read("a_key_no_module_reads", _source())
  assert _read("checkpoint_every", _source())
