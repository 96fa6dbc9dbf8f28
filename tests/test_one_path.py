"""The one teacher loop and the one distillation loop (``modes.loop``) reproduce, bit for bit, what
each family's own modes computed before they were merged: the parameters after two teacher steps
(classes, captioned digits) and the EMA generator after two Di[M]O steps (all three families), at
tiny size on the CPU.

The golden fingerprints (``tests/data/family_steps_golden.npz``: per parameter leaf, the SHA-1 of
its float32 bytes and its float64 sum) were written by ``python tests/family_runs.py`` at commit
eaf833c, through ``modes.teacher`` / ``modes.distill`` (classes), ``modes.teacher_text`` /
``modes.distill_text`` (captioned digits) and ``modes.distill_meissonic`` (Meissonic), which the
families layer replaced. Equal SHA-1s mean equal bits; the sums only say how far apart the values
are when they are not."""
import os

import numpy as np
import pytest

import family_runs as runs
from dimo_jax.modes import distill, teacher

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "family_steps_golden.npz")


def _same(got: dict, prefix: str):
  with np.load(GOLDEN) as g:
    want = runs.from_arrays(g, prefix)
  assert sorted(got) == sorted(want)
  far = {k: (got[k][1], want[k][1]) for k in want if got[k][0] != want[k][0]}
  assert not far, f"{prefix}: {len(far)} of {len(want)} leaves differ, e.g. {list(far.items())[:3]}"


def _teacher(folder, family):
  c = runs.CONFIGS[family](folder, "teacher", runs.STEPS)
  path = os.path.join(folder, family, "teacher")
  out = teacher.train_teacher(c, path)
  assert out["step"] == runs.STEPS
  return path


@pytest.mark.parametrize("family", ["classes", "captioned_digits", "meissonic"])
def test_first_steps_equal_the_old_paths(tmp_path, family):
  folder = str(tmp_path)
  c = runs.CONFIGS[family](os.path.join(folder, family), "distill", runs.STEPS)
  if family != "meissonic":
    path = _teacher(folder, family)
    _same(runs.folder_fingerprint(path), f"{family}/teacher")
    c.teacher.checkpoint = path
  out = distill.train_distill(c, os.path.join(folder, family, "distill"))
  assert out["step"] == runs.STEPS and not out["preempted"]
  _same(runs.folder_fingerprint(os.path.join(folder, family, "distill", "generator")), f"{family}/generator")
