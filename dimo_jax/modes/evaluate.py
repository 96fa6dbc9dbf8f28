"""``mode=evaluate`` for every family: the evaluators that ``config.evaluate.evaluators`` names (or
the family's defaults, ``evaluation.evaluators.FAMILY_EVALUATORS``) fill the rows of the teacher
at its step counts and the generator at one step; ``results.json`` and ``table.md`` land in
``config.evaluate.output_dir`` (default ``<workdir>/eval``).

| family | default evaluators | what a person gets |
|---|---|---|
| ``classes`` | ``image_sets``, ``token_tv`` | the paper's Table 1 (``evaluation.table1``) |
| ``captioned_digits`` | ``prompt_following`` | prompt accuracy, FD and diversity (``evaluation.prompt_following``) |
| ``meissonic`` | ``t2i_export`` | the HPS v2 / GenEval images and scoring commands (``evaluation.t2i_export``) |

A workdir another live run holds (``<workdir>/run.lock``), or whose distillation stopped before
writing its generator, is refused with one line saying which.
"""
from __future__ import annotations

import os

from absl import logging

from dimo_jax.evaluation import evaluators
from dimo_jax.evaluation.tables import ratio_note
from dimo_jax.modes import loop
from dimo_jax.modes.sample import family_of
from dimo_jax.storage import checkpoints, loaders, workdir_lock


def check_workdir_ready(workdir: str) -> None:
  """Stops (``UserError``, one line) when another live run holds ``workdir``'s lock, or when the
  workdir holds distillation checkpoints but no generator yet (an unfinished run)."""
  lock = workdir_lock.WorkdirLock(workdir)
  record = lock.read()
  mine = lock.path in workdir_lock._HELD  # pylint: disable=protected-access  (this process's own run)
  if record is not None and not mine and lock.stale_reason(record) is None:
    raise checkpoints.WorkdirInUse(
        f"workdir {lock.workdir} is held by a running job (host {record.get('host', '?')}, pid "
        f"{record.get('pid', '?')}, {workdir_lock.LOCK_FILE}): evaluate it once that run has finished")
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and not os.path.isdir(loaders.generator_dir(workdir)):
    raise checkpoints.UserError(
        f"the run in {lock.workdir} is unfinished (checkpoints in {ckpt_dir}, no generator/ yet): resume it "
        "with --config.mode=distill, or name a generator with --config.evaluate.generator")


def run_evaluate(config, workdir: str) -> dict:
  """``mode=evaluate`` (see the module docstring); returns the results (also in ``results.json``)
  with the markdown under ``table``."""
  if not workdir:
    raise ValueError("no workdir given; pass --workdir=<distillation workdir>")
  family = family_of(config)
  if os.path.isdir(workdir):
    check_workdir_ready(workdir)
  names = evaluators.evaluator_names(config, family)
  out_dir = evaluators.output_dir(config, workdir)
  checkpoints.makedirs(out_dir)
  results = evaluators.evaluate(evaluators.Request(config, os.fspath(workdir), out_dir, family), names)
  logging.info("Evaluation (%s):\n%s\n%s", ", ".join(names), results["table"], ratio_note(results))
  return results


run = loop.entry(run_evaluate)  # what ``dimo_jax.main`` calls for ``config.mode='evaluate'``
