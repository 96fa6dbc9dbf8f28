"""``mode=evaluate`` for every family: the evaluators that ``config.evaluate.evaluators`` names (or
the family's defaults, ``Family.evaluators``) fill the rows of the teacher
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
from dimo_jax.families import base as families
from dimo_jax.modes import loop
from dimo_jax.modes.sample import family_of
from dimo_jax.storage import checkpoints, preflight


def check_workdir_ready(workdir: str) -> None:
  """Stops (``UserError``, one line) when another live run holds ``workdir``'s lock, or when the
  workdir holds distillation checkpoints but no generator yet (``modes.loop.check_stored_run``)."""
  loop.check_stored_run(workdir, "evaluate")


def run_evaluate(config, workdir: str) -> dict:
  """``mode=evaluate`` (see the module docstring); returns the results (also in ``results.json``)
  with the markdown under ``table``."""
  if not workdir:
    raise ValueError("no workdir given; pass --workdir=<distillation workdir>")
  family = family_of(config)
  if os.path.isdir(workdir):
    check_workdir_ready(workdir)
  names = evaluators.evaluator_names(config, family, families.get_family(config).evaluators)
  out_dir = evaluators.output_dir(config, workdir)
  preflight.check_write_targets([(out_dir, 0, "config.evaluate.output_dir")])
  checkpoints.makedirs(out_dir)
  results = evaluators.evaluate(evaluators.Request(config, os.fspath(workdir), out_dir, family), names)
  logging.info("Evaluation (%s):\n%s\n%s", ", ".join(names), results["table"], ratio_note(results))
  return results


run = loop.entry(run_evaluate)  # what ``dimo_jax.main`` calls for ``config.mode='evaluate'``
