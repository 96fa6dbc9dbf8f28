"""``mode=teacher``: trains ``config.family``'s masked diffusion model (``Family.teacher_run``:
``method.mdm`` for the classes, ``method.mdm_text`` for the captioned digits) through one loop
(``modes.loop.train_teacher``).

Resumes from the latest intact checkpoint of its workdir (after checking that the config did not
change what the run computes); each step's randomness and batch are pure functions of the step,
so an interrupted run ends with the parameters of an uninterrupted one. The workdir is locked
for the run.
"""

from __future__ import annotations

from dimo_jax.families.classes import REPORT_FILE  # noqa: F401 (the classes' teacher report)
from dimo_jax.modes import loop
from dimo_jax.modes.loop import EARLY_STOP_FILE, train_teacher  # noqa: F401

run = loop.entry(train_teacher)  # what ``dimo_jax.main`` calls for ``config.mode='teacher'``
