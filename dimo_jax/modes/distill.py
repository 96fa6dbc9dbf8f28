"""``mode=distill``: Di[M]O (``method.dimo``) of ``config.family``'s teacher into a one-step
generator, for every family through one loop (``modes.loop.train_distill``); the finished EMA
generator is written to ``<workdir>/generator``.

The workdir is locked for the run; a rerun resumes from the latest intact checkpoint after
checking that the config did not change what the run computes. Non-finite token gradients are
zeroed by the step and counted; ``config.distill.max_nonfinite_steps`` consecutive steps with
any stop the run. With ``config.distill.evaluate_at_end`` the run ends with the family's table
(``Family.evaluate_table``) or ``mode=evaluate``'s.
"""

from __future__ import annotations

from typing import Optional

import jax

from dimo_jax.evaluation import tables
from dimo_jax.modes import evaluate, loop


def train_distill(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """The distillation (``modes.loop.train_distill``), then ``mode=evaluate``'s table when the
  family has none of its own and ``config.distill.evaluate_at_end`` asks for one. Returns the
  last logged metrics, ``step``, ``preempted`` and, with the table, ``table``."""
  final = loop.train_distill(config, workdir, stop_after=stop_after)
  if final.pop("evaluate", False):
    results = evaluate.run_evaluate(config, workdir)
    table = tables.format_table(results)
    note = "\n".join(n for n in (tables.ratio_note(results), tables.token_note(results)) if n)
    table = table + ("\n\n" + note if note else "")
    if jax.process_index() == 0:
      print(table, flush=True)
    final["table"] = table
  return final


run = loop.entry(train_distill)  # what ``dimo_jax.main`` calls for ``config.mode='distill'``
