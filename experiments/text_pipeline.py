"""Di[M]O on text, end to end: the embedded corpus in bytes -> a masked-diffusion teacher
(``method.mdm``) -> a one-step generator (``method.dimo``) -> a causal reference LM -> the table.

  python experiments/text_pipeline.py --workdir=/tmp/text_pipeline [--seed=1] [--config.distill.steps=600]

Rows: the teacher with each sampler (``config.evaluate.teacher_samplers``) at 1, 2, 4, ..., 64 steps
and at the sequence length, the Di[M]O generator at 1 step (1..k with
``--config.distill.generator_steps=k``), the real held-out text; columns:
generative perplexity under the reference LM, mean unigram entropy, distinct 1-4-grams, repeated
4-grams. Every draw is an exact float64 categorical draw. Writes ``<workdir>/eval_seed<seed>/``:
``table.md``, ``results.json`` (with each phase's wall time and the machine's load), ``gen_ppl.png``
and ``samples.txt``. The teacher and the reference LM are cached in the workdir (keyed by their
settings), so reruns with other distillation settings or seeds reuse them. ``--seed`` seeds the
distillation and the sampling; the teacher and the reference LM keep ``config.seed``.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dimo_jax.evaluation import text_eval  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "text.py"))
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/text_pipeline", "where the caches and the report go")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the distillation and of the samples")


def main(argv):
  del argv
  config, workdir, seed = _CONFIG.value, _WORKDIR.value, _SEED.value
  os.makedirs(workdir, exist_ok=True)
  log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
  times, t_all = {}, time.time()
  load = [os.getloadavg()[0]]

  t0 = time.time()
  corpus = text_eval.load_corpus(config)
  ds = corpus.dataset
  log(f"corpus {corpus.source}: {ds.num_train} training and {ds.num_val} held-out sequences of {ds.seq_len} "
      f"tokens, vocabulary {ds.vocab_size}")
  model = text_eval.build_teacher(config, corpus)
  teacher_params, teacher_info = text_eval.train_teacher(config, corpus, model, workdir=workdir, log=log)
  times["teacher"] = time.time() - t0
  log(f"teacher: held-out masked loss {teacher_info['val_loss']:.4f} nats per token")
  load.append(os.getloadavg()[0])

  t0 = time.time()
  gen_params, distill_info = text_eval.distill(config, model, teacher_params, seed=seed, log=log)
  times["distill"] = time.time() - t0
  load.append(os.getloadavg()[0])

  t0 = time.time()
  lm = text_eval.build_reference_lm(config, corpus)
  lm_params, lm_info = text_eval.train_reference(config, corpus, lm, workdir=workdir, log=log)
  times["reference_lm"] = time.time() - t0
  load.append(os.getloadavg()[0])

  t0 = time.time()
  k = int(config.distill.get("generator_steps", 1))  # the generator's rows at 1 .. k steps
  sets = text_eval.sample_sets(config, corpus, model, teacher_params, gen_params, seed=seed, workdir=workdir,
                               log=log, generator_steps=range(1, k + 1),
                               generator_schedule=config.distill.get("generator_schedule", "linear"))
  rows = text_eval.evaluate(config, corpus, sets, lm, lm_params)
  times["evaluate"] = time.time() - t0
  load.append(os.getloadavg()[0])
  times["total"] = time.time() - t_all

  info = {"seed": seed, "config_seed": int(config.seed), "corpus": corpus.source, "teacher": teacher_info,
          "distill": distill_info, "reference_lm": lm_info, "seconds": times, "load_average_1min": load,
          "distill_settings": config.distill.to_dict(), "cpu_count": os.cpu_count()}
  paths = text_eval.write_report(os.path.join(workdir, f"eval_seed{seed}"), corpus, rows, sets, info)
  print(open(paths["table"]).read())
  print(json.dumps({"seconds": {k: round(v, 1) for k, v in times.items()}, "load": load}))
  log(f"wrote {', '.join(paths.values())}")


if __name__ == "__main__":
  app.run(main)
