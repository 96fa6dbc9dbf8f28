"""Di[M]O on the embedded digits benchmark: settings against seeds, scored by FD-pixel.

Each variant (a dict of ``config.distill`` overrides on ``configs/digits.py``, plus ``name`` and
an optional ``eval_r_init``) is distilled from the shipped teacher once per seed. Every
``--eval_every`` steps the EMA generator draws ``--num_samples`` one-step samples (labels
``i mod 10``) and they are scored by the Frechet distance of their grey-level token values to
the digits validation split (the README table's FD-pixel). At the end a second sample set
(another key) shows how much of a difference is the FD's own sampling noise.

  python experiments/digits_sweep.py --out=/tmp/sweep --seeds=0,1,2 \\
      --variants='[{"name": "r06"}, {"name": "r1", "r_init": "fix_1.0"}]'

Prints a markdown table (per seed, and mean / sample std over seeds) and writes
``sweep_<variant names>.json`` and ``.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import digits  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.core import samplers
from dimo_jax.data import datasets
from dimo_jax.evaluation import metrics
from dimo_jax.method import dimo
from dimo_jax.storage import loaders

EVAL_KEYS = (2, 5)  # the sample keys of the final FD (the first is also used along the way)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output folder (sweep_*.json / .md)")
  p.add_argument("--teacher", default=os.path.join(ROOT, "pretrained", "digits_teacher"),
                 help="teacher workdir (default: the shipped digits teacher)")
  p.add_argument("--variants", default='[{"name": "default"}]',
                 help="JSON list of dicts of config.distill overrides, each with a 'name' "
                      "(and optionally 'eval_r_init', default: the variant's r_init)")
  p.add_argument("--seeds", default="0", help="comma-separated distillation seeds")
  p.add_argument("--eval_every", type=int, default=200)
  p.add_argument("--num_samples", type=int, default=1000)
  args = p.parse_args(argv)
  try:
    variants = json.loads(args.variants)
  except json.JSONDecodeError as e:
    raise ValueError(f"--variants is not valid JSON ({e}); pass e.g. '[{{\"name\": \"a\", \"gen_lr\": 1e-4}}]'")
  if not isinstance(variants, list) or not all(isinstance(v, dict) and "name" in v for v in variants):
    raise ValueError("--variants must be a JSON list of dicts, each with a 'name'")
  allowed = set(digits.get_config().distill) | {"name", "eval_r_init"}
  for v in variants:
    unknown = set(v) - allowed
    if unknown:
      raise ValueError(f"--variants: unknown keys {sorted(unknown)}; allowed: the keys of config.distill "
                       f"(configs/digits.py), 'name' and 'eval_r_init'")
  try:
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds={args.seeds!r}: pass comma-separated integers, e.g. 0,1,2") from None
  if not args.seeds:
    raise ValueError("--seeds is empty; pass e.g. --seeds=0,1,2")
  args.variants = variants
  return args


def variant_config(variant: dict):
  c = digits.get_config()
  for k, v in variant.items():
    if k not in ("name", "eval_r_init"):
      c.distill[k] = tuple(v) if isinstance(v, list) else v
  r_eval = variant.get("eval_r_init", float(str(c.distill.r_init).split("_")[-1]))
  return c, float(r_eval)


def within_class_l2(tokens: np.ndarray, labels: np.ndarray) -> float:
  """Mean pairwise L2 distance between the grey-level token vectors of samples of the same class
  (averaged over classes): the per-class diversity (0 for a deterministic generator)."""
  tokens, labels = np.asarray(tokens, np.float64), np.asarray(labels)
  means = []
  for c in np.unique(labels):
    x = tokens[labels == c]
    if len(x) < 2:
      continue
    sq = np.sum(x * x, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    n = len(x)
    means.append(np.sum(np.sqrt(d2)) / (n * (n - 1)))
  return float(np.mean(means))


def run_variant(variant, seed, model, teacher_params, ref, labels, every):
  c, r_eval = variant_config(variant)
  dist = dimo.build_distiller(c, model)
  state = dist.init_state(teacher_params, seed)
  step, state = dist.jit_step(state)
  gen = jax.jit(lambda p, k: samplers.one_step_generate(model, p, k, labels, r_init=r_eval, sigma=c.distill.sigma))

  def draw(params, key):
    return np.asarray(gen(params, jax.random.key(key)), np.float64)

  def fd(tokens):
    return metrics.fid_from_features(tokens, ref)

  curve, t0 = [], time.time()
  for i in range(1, c.distill.steps + 1):
    state, _ = step(state)
    if i % every == 0 and i < c.distill.steps:
      curve.append({"step": i, "fd": fd(draw(state.ema_params, EVAL_KEYS[0]))})
      print(f"  [{variant['name']} seed {seed}] step {i}: FD-pixel {curve[-1]['fd']:.1f} "
            f"({time.time() - t0:.0f}s)", flush=True)
  seconds = time.time() - t0
  final_sets = [draw(state.ema_params, k) for k in EVAL_KEYS]
  final = [fd(x) for x in final_sets]
  diversity = within_class_l2(final_sets[0], np.asarray(labels))
  curve.append({"step": c.distill.steps, "fd": final[0]})
  print(f"  [{variant['name']} seed {seed}] final: FD-pixel {final[0]:.1f} / {final[1]:.1f} "
        f"(keys {EVAL_KEYS}), within-class L2 {diversity:.1f} ({seconds:.0f}s)", flush=True)
  return {"name": variant["name"], "seed": seed, "eval_r_init": r_eval, "curve": curve, "final": final,
          "within_class_l2": diversity, "seconds": seconds}


def summarize(runs) -> str:
  lines = ["| variant | seed | FD-pixel along the way (EMA) | final FD-pixel (key 2 / key 5) | within-class L2 |",
           "|---|---|---|---|---|"]
  for r in runs:
    along = ", ".join(f"{p['fd']:.1f}@{p['step']}" for p in r["curve"][:-1])
    lines.append(f"| {r['name']} | {r['seed']} | {along} | {r['final'][0]:.1f} / {r['final'][1]:.1f} | "
                 f"{r['within_class_l2']:.1f} |")
  lines += ["", "| variant | seeds | mean final FD-pixel (both keys) | std over seeds |", "|---|---|---|---|"]
  for name in dict.fromkeys(r["name"] for r in runs):
    per_seed = [float(np.mean(r["final"])) for r in runs if r["name"] == name]
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan")
    lines.append(f"| {name} | {len(per_seed)} | {np.mean(per_seed):.1f} | {std:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  cfg = digits.get_config()
  ds = datasets.load_dataset(cfg.data)
  model, teacher_params, _ = loaders.load_teacher(args.teacher)
  ref = np.asarray(ds.val_tokens, np.float64)
  print(f"validation split: within-class L2 {within_class_l2(ds.val_tokens, ds.val_labels):.1f}", flush=True)
  labels = jnp.asarray(np.arange(args.num_samples) % max(ds.num_classes, 1), jnp.int32)
  runs = [run_variant(v, seed, model, teacher_params, ref, labels, args.eval_every)
          for v in args.variants for seed in args.seeds]
  table = summarize(runs)
  print(table)
  stem = "sweep" + "".join(f"_{v['name']}" for v in args.variants)
  with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
    json.dump({"args": vars(args), "runs": runs}, f, indent=1, default=str)
  with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
    f.write(table + "\n")
  return runs


if __name__ == "__main__":
  main()
