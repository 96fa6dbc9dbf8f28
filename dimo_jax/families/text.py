"""The text masked-diffusion family (``config.family = "text"``): an MD4 / MDLM-style teacher on 1-D
token sequences (``networks.text_mdm``), trained by ``method.mdm`` and distilled by ``method.dimo``
unchanged; unconditional (every network sees the label 0, the step draws it itself).

What the modes need, against ``families.base.Family``: the teacher's run (``teacher_run``: the
corpus of ``data.text_corpus``, ``method.mdm.compile_teacher``, the held-out masked loss; the
finished teacher's ``config.json`` gets ``finished_step``), the teacher ``mode=distill`` trains first
(``teacher_to_train``: ``<workdir>/teacher`` unless ``config.teacher.checkpoint`` names one or it is
finished), the teacher and generator loaders (``evaluation.text_eval.load_network``: a folder's
latest checkpoint and its ``config.json``, whose ``text_network`` entry holds the vocabulary and
sequence length), the condition source (none: ``ConditionSource()``), the table at the end of a
distillation and the default evaluator (``text_lm`` of ``evaluation.text_eval``) and
``decode_text`` (tokens to strings; ``decode`` is None: text is not pictures).
"""
from __future__ import annotations

import os
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.data import text_corpus
from dimo_jax.data.batching import batch_iterator
from dimo_jax.evaluation import evaluators as plugins, text_eval
from dimo_jax.families import base
from dimo_jax.method import mdm
from dimo_jax.networks import conditioning, maskgit
from dimo_jax.storage import checkpoints


def is_finished(path: str, steps: int) -> bool:
  """Whether ``path`` holds a text teacher trained to ``steps`` (its ``config.json``'s ``finished_step``)."""
  cfg = checkpoints.read_config(path) if os.path.isdir(path) else None
  return bool(cfg) and int(cfg.get("finished_step", -1)) >= steps


class TextFamily(base.Family):
  name = "text"
  compute_fields = maskgit.COMPUTE_FIELDS
  evaluators = ("text_lm",)

  # -------------------------------------------------------------- mode=teacher
  def teacher_run(self, config, workdir: str, mesh) -> base.TeacherRun:
    corpus = text_corpus.load_text_corpus(config.data)
    model = text_eval.build_teacher(config, corpus)
    settings = mdm.TeacherSettings.from_config(config.train)
    fns = mdm.compile_teacher(model, mesh, settings, model.mask_id, 0)
    batch = int(config.train.batch_size)
    labels = jnp.asarray(text_eval.conditions(batch))
    seed = int(config.seed)

    def batches(start: int):
      for tokens, _ in batch_iterator(np.asarray(corpus.dataset.train_tokens), None, batch, seed,
                                      start_step=int(start)):
        yield (jax.device_put(tokens, fns.batch_sharding), jax.device_put(labels, fns.batch_sharding))

    def validate(state):
      return mdm.evaluate_val_loss(conditioning.make_apply_fn(model), state.ema_params,
                                   corpus.dataset.val_tokens, None, mask_id=model.mask_id, null_label=0,
                                   key=jax.random.key(0), schedule=settings.mask_schedule, loss_on="masked")

    run_config = dict(base.config_dict(config), family=self.name,
                      text_network={"vocab_size": corpus.vocab_size, "seq_len": corpus.seq_len,
                                    "sep_id": corpus.sep_id, "source": corpus.source})
    steps = int(config.train.steps)

    def finish(state, step, final):
      del state, step, final
      if jax.process_index() == 0:
        checkpoints.write_config(workdir, dict(run_config, finished_step=steps, role="teacher"))
      return {}

    return base.TeacherRun(model=model, fns=fns, run_config=run_config, batches=batches,
                           num_params=maskgit.count_params(jax.eval_shape(model.init_params, jax.random.key(0))),
                           describe=f"text teacher on {corpus.source}", validate=validate, finish=finish,
                           finished=lambda: is_finished(workdir, steps))

  def teacher_to_train(self, config, workdir: str):
    path = text_eval.teacher_dir(config, workdir)
    if config.teacher.get("checkpoint", "") or is_finished(path, int(config.train.steps)):
      return None
    return path

  # -------------------------------------------------------------- networks
  def _load(self, config, path: str, use_ema: bool = True) -> base.Loaded:
    model, params, stored = text_eval.load_network(path, use_ema=use_ema, overrides=self.compute_overrides(config))
    return base.Loaded(model=model, params=params, stored=stored)

  def load_teacher(self, config, workdir: str) -> base.Loaded:
    return self._load(config, text_eval.teacher_dir(config, workdir), bool(config.teacher.get("use_ema", True)))

  def load_generator(self, config, path: str) -> base.Loaded:
    folder = os.path.join(path, "generator")
    return self._load(config, folder if os.path.isdir(folder) else path)

  def condition_source(self, config, teacher: base.Loaded) -> base.ConditionSource:
    return base.ConditionSource()  # unconditional: the Di[M]O step gives every example the label 0

  def evaluate_table(self, config, workdir: str, teacher: base.Loaded, generator_params):
    """The text table (``config.evaluate.evaluators``, default ``text_lm``) of the generator just
    written to ``<workdir>/generator``; printed and returned."""
    req = plugins.Request(config, os.fspath(workdir), plugins.output_dir(config, workdir), self.name)
    results = plugins.evaluate(req, plugins.evaluator_names(config, self.name, self.evaluators))
    if jax.process_index() == 0:
      print(results["table"], flush=True)
    return results["table"]

  def network_config(self, teacher: base.Loaded, model) -> dict:
    return {"text_network": text_eval.stored_network(teacher.stored, "the teacher")}

  # -------------------------------------------------------------- what a person reads
  def decode_text(self, tokens, stored: dict) -> List[str]:
    """One string per row of ``tokens [N, L]`` with the corpus' tokenizer (rebuilt from ``stored``)."""
    return text_eval.decode_stored(tokens, stored)


FAMILY = TextFamily()
