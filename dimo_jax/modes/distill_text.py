"""``mode=distill`` for the captioned digits (``config.data.name='captioned_digits'``): trains the
teacher first when ``config.teacher.checkpoint`` (default ``<workdir>/teacher``) holds none, then
Di[M]O (``method.dimo`` with a condition pytree per example) from the distillation prompts alone,
writes the EMA generator to ``<workdir>/generator`` and, with ``config.distill.evaluate_at_end``,
the prompt-following table (``evaluate_captioned``) to ``<workdir>/eval``.

The prompts of each step (``distill_conditions``) are a pure function of ``(config.seed, step)``:
``batch_size`` prompts for the generator update and ``aux_updates x batch_size`` fresh ones for the
auxiliary updates, drawn uniformly from ``data.captions.distill_prompts(config.distill.prompt_set)``
(``full``: the 30 full prompts, the default; ``all``: also the 50 partial ones); the negative
prompt is the empty prompt.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import numpy as np
from absl import logging

from dimo_jax.core import sharding
from dimo_jax.data import captions
from dimo_jax.evaluation import prompt_following
from dimo_jax.method import dimo
from dimo_jax.modes import loop, teacher_text
from dimo_jax.storage import checkpoints


def distill_conditions(table, prompts: np.ndarray, step: int, seed: int, batch: int, aux_updates: int) -> dict:
  """``{"gen": cond [B], "aux": cond [A, B], "neg": cond [1]}`` of one Di[M]O step."""
  rng = np.random.default_rng([int(seed), 7, int(step)])
  gen = rng.choice(prompts, size=(batch,))
  aux = rng.choice(prompts, size=(aux_updates, batch))
  return {"gen": captions.gather(table, gen), "aux": captions.gather(table, aux),
          "neg": captions.gather(table, np.zeros((1,), np.int32))}


def generator_dir(workdir: str) -> str:
  return os.path.join(workdir, "generator")


def train_distill_text(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """The whole captioned-digits path (see the module docstring); returns the last metrics and,
  with ``evaluate_at_end``, the table."""
  dc = config.distill
  steps = int(dc.steps)
  workdir = checkpoints.abspath(workdir)
  checkpoints.makedirs(workdir)
  t_dir = teacher_text.teacher_dir(config, workdir)
  if not teacher_text.is_finished(t_dir, int(config.train.steps)) and not config.teacher.get("checkpoint", ""):
    logging.info("No finished teacher in %s: training it first.", t_dir)
    teacher_text.train_text_teacher(config, t_dir)
  model, teacher_params, stored = teacher_text.load_text_teacher(t_dir, use_ema=bool(config.teacher.use_ema))
  data = teacher_text.load_captioned(config)
  table = data.table
  cond_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), table)
  dist = dimo.build_distiller(config, model, cond_spec=cond_spec)
  mesh = sharding.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)))
  state = dist.init_state(teacher_params, int(config.seed))
  step_fn, state = dist.compile_step(state, mesh)  # stops here if the step cannot fit the device
  prompts = captions.distill_prompts(str(dc.get("prompt_set", "full")))
  logging.info("Di[M]O (text): %d steps at batch %d from %d prompts (%d held out).", steps,
               dist.s.batch_size, len(prompts), len(captions.held_out_prompts()))
  last = stop_after or steps
  history, final, t0 = [], {}, time.time()
  for step in range(last):
    conds = distill_conditions(table, prompts, step, int(config.seed), dist.s.batch_size, dist.s.aux_updates)
    state, metrics = step_fn(state, dist.place_conditions(conds))
    history.append(metrics)
    if (step + 1) % int(dc.get("log_every", 100)) == 0 or step + 1 == last:
      final = {k: float(np.mean([float(m[k]) for m in history])) for k in history[0]}
      logging.info("distill step %d (%.1fs): %s", step + 1, time.time() - t0,
                   ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))
      history = []
  final["step"], final["seconds"] = last, time.time() - t0
  if last < steps:
    return final
  gen_config = dict(stored, role="generator", distill=dict(dc.to_dict() if hasattr(dc, "to_dict") else dc))
  checkpoints.save_params(generator_dir(workdir), jax.device_get(state.gen.params), gen_config,
                          ema_params=jax.device_get(state.ema_params), step=steps)
  logging.info("Generator written to %s after %.1fs of distillation.", generator_dir(workdir), final["seconds"])
  if dc.get("evaluate_at_end", True):
    final["table"] = evaluate_captioned(config, workdir, teacher=(model, teacher_params),
                                        generator=jax.device_get(state.ema_params), data=data)
  return final


def evaluate_captioned(config, workdir: str, *, teacher=None, generator=None, data=None) -> str:
  """The prompt-following table of the teacher (its sampler at ``config.evaluate.teacher_steps``)
  and the generator (one step); writes ``results.json``, ``table.md`` and grids to
  ``config.evaluate.output_dir`` (default ``<workdir>/eval``) and returns the table."""
  ec = config.evaluate
  out_dir = ec.get("output_dir", "") or os.path.join(workdir, "eval")
  checkpoints.makedirs(out_dir)
  data = data or teacher_text.load_captioned(config)
  if teacher is None:
    model, t_params, _ = teacher_text.load_text_teacher(teacher_text.teacher_dir(config, workdir),
                                                        use_ema=bool(config.teacher.use_ema))
  else:
    model, t_params = teacher
  if generator is None:
    params, ema, _ = checkpoints.load_params(generator_dir(workdir))
    generator = ema if ema is not None else params
  scorer = prompt_following.Scorer(data.ds, data.thresholds, os.path.join(out_dir, "classifier"))
  ids = prompt_following.eval_prompts(int(ec.per_prompt))
  rows = []
  real = scorer.real
  rows.append({"model": "real digits", "steps": 0, "scores": scorer.score(real, scorer.real_ids)})
  for steps in ec.teacher_steps:
    t0 = time.time()
    toks = prompt_following.teacher_samples(model, t_params, data.table, ids, steps=int(steps),
                                            guidance=float(config.teacher.guidance),
                                            temperature=tuple(ec.teacher_temperature), seed=int(ec.seed))
    rows.append({"model": "teacher (Meissonic sampler)", "steps": int(steps), "scores": scorer.score(toks, ids),
                 "seconds": time.time() - t0})
    if int(steps) in (1, max(ec.teacher_steps)):
      prompt_following.save_grid(toks, os.path.join(out_dir, f"teacher_{int(steps)}.png"), int(ec.per_prompt))
  toks = prompt_following.generator_samples(model, generator, data.table, ids, r_init=float(ec.r_init),
                                            sigma=float(ec.sigma), temperature=float(ec.gen_temp),
                                            seed=int(ec.seed))
  rows.append({"model": "Di[M]O generator", "steps": 1, "scores": scorer.score(toks, ids)})
  prompt_following.save_grid(toks, os.path.join(out_dir, "generator_1.png"), int(ec.per_prompt))
  table = prompt_following.format_table(rows)
  notes = [prompt_following.goal_note(rows, s) for s in prompt_following.SETS]
  text = table + "\n\n" + "\n".join(n for n in notes if n)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump({"rows": rows, "classifier": {k: scorer.meta.get(k) for k in ("val_accuracy", "train_accuracy")}},
                f, indent=1, default=float)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
      f.write(text + "\n")
    print(text, flush=True)
  return text


run = loop.entry(train_distill_text)
