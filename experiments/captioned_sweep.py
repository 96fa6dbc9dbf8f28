"""Distillation variants of the captioned-digits task against one trained teacher: how the
settings of ``configs/captioned_digits.py`` were chosen.

Each variant is a set of config overrides (dotted keys); each runs Di[M]O from the same teacher
for each ``--seeds`` value (``config.seed``: the generator's draws and the prompts of each step)
and scores the EMA generator with ``--per_prompt`` samples of every full prompt. The teacher's
rows (its sampler at ``--teacher_steps``, at each guidance a variant uses) are computed once per
guidance and cached in ``<out>/teacher_g<guidance>.json``.

  python experiments/captioned_sweep.py --teacher=/tmp/captioned/teacher --out=/tmp/cd_sweep \\
      --seeds=0 --variants='[{"name": "base"}, {"name": "g3", "teacher.guidance": 3.0}]'

Writes ``<out>/<variant>_s<seed>.json`` (its scores) and prints one line per run and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from configs import captioned_digits  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.evaluation import prompt_following  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.families import captioned_digits as family  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.modes import distill  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.storage import checkpoints  # noqa: E402  pylint: disable=wrong-import-position


def set_dotted(config, key: str, value) -> None:
  node = config
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  if isinstance(value, list):
    value = tuple(value)
  node[last] = value


def teacher_rows(config, model, params, data, scorer, ids, steps, out: str):
  g = float(config.teacher.guidance)
  path = os.path.join(out, f"teacher_g{g:g}_n{len(ids)}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  rows = []
  for s in steps:
    toks = prompt_following.teacher_samples(model, params, data.table, ids, steps=int(s), guidance=g,
                                            temperature=tuple(config.evaluate.teacher_temperature),
                                            seed=int(config.evaluate.seed))
    rows.append({"model": "teacher (Meissonic sampler)", "steps": int(s), "scores": scorer.score(toks, ids)})
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(rows, f, default=float)
  os.replace(tmp, path)  # several sweeps may share --out
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  p.add_argument("--teacher", required=True, help="a trained captioned-digits teacher folder")
  p.add_argument("--out", required=True)
  p.add_argument("--variants", default='[{"name": "base"}]')
  p.add_argument("--seeds", default="0")
  p.add_argument("--per_prompt", type=int, default=50)
  p.add_argument("--teacher_steps", default="1,4,8,16")
  p.add_argument("--gen_temps", default="", help="generator temperatures to score (default: the config's)")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  variants = json.loads(args.variants)
  seeds = [int(s) for s in args.seeds.split(",")]
  t_steps = [int(s) for s in args.teacher_steps.split(",")]
  temps = [float(t) for t in args.gen_temps.split(",") if t]
  base = captioned_digits.get_config()
  data = family.load_captioned(base)
  model, t_params, _ = family.load_text_teacher(args.teacher, use_ema=True)
  scorer = prompt_following.Scorer(data.ds, data.thresholds, os.path.join(args.out, "classifier"))
  ids = prompt_following.eval_prompts(args.per_prompt)
  summary = []
  for v in variants:
    for seed in seeds:
      config = captioned_digits.get_config()
      for k, val in v.items():
        if k != "name":
          set_dotted(config, k, val)
      config.seed = seed
      config.teacher.checkpoint = args.teacher
      config.distill.evaluate_at_end = False
      workdir = os.path.join(args.out, f"{v['name']}_s{seed}")
      t0 = time.time()
      distill.train_distill(config, workdir)
      seconds = time.time() - t0
      params, ema, _ = checkpoints.load_params(os.path.join(workdir, family.GENERATOR_SUBDIR))
      ec = config.evaluate
      rows = teacher_rows(config, model, t_params, data, scorer, ids, t_steps, args.out)
      n_teacher = len(rows)
      for temp in temps or [float(ec.gen_temp)]:
        toks = prompt_following.generator_samples(model, ema if ema is not None else params, data.table, ids,
                                                  r_init=float(ec.r_init), sigma=float(ec.sigma),
                                                  temperature=temp, seed=int(ec.seed))
        rows.append({"model": f"Di[M]O generator (temperature {temp:g})", "steps": 1,
                     "scores": scorer.score(toks, ids)})
      rec = {"variant": v, "seed": seed, "distill_seconds": seconds, "rows": rows}
      with open(os.path.join(args.out, f"{v['name']}_s{seed}.json"), "w") as f:
        json.dump(rec, f, indent=1, default=float)
      for row in rows[n_teacher:]:
        line = {"name": v["name"], "seed": seed, "s": round(seconds), "generator": row["model"]}
        for name in ("seen", "held_out"):
          best = max(r["scores"][name]["prompt_acc"] for r in rows[:n_teacher])
          best_fd = min(r["scores"][name]["fd_pixel"] for r in rows[:n_teacher])
          g = row["scores"][name]
          line[name] = (f"acc {g['prompt_acc']:.1f} (teacher best {best:.1f}) fd {g['fd_pixel'] / best_fd:.2f}x "
                        f"div {g['diversity']:.1f}")
        summary.append(line)
        print(json.dumps(line), flush=True)
  print(jax.devices()[0].platform, json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
