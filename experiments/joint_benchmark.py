"""Di[M]O with the defaults of ``configs/tokens.py`` on a family of known joints nobody tuned for.

Each seed draws one joint with exact probabilities (``data.joints.draw_joint``: mixtures of
Markov chains of order 1 to 3, hidden Markov models, a sum rule, copy and permutation
structure, at enumerable sizes). For each joint the script

1. writes ``--train_size`` i.i.d. samples to ``<out>/<joint>/tokens.npy``;
2. trains a teacher through the command line (``python -m dimo_jax.main
   --config=configs/tokens.py --config.mode=teacher``, the defaults and the data path only);
3. scores the teacher at every step count from 1 to L with both samplers (confidence and
   ancestral) by the exact total-variation distance of ``--num_samples`` samples to the true
   joint, next to the sampling floor (an i.i.d. sample of the truth of the same size);
4. distils it through the command line (``--config.mode=distill``, the defaults plus any
   variant's ``config.distill`` overrides) and scores the one-step EMA generator the same way,
   with its diversity, its most frequent sequence's share (collapse) and its NaN count.

Results are appended to ``<out>/results.jsonl`` as each run finishes and the table is rewritten
to ``<out>/table.md`` (partial tables exist while it runs). Teachers and finished runs are
reused by a rerun.

  python experiments/joint_benchmark.py --out=/tmp/jb_select --seeds=0,1,2,3
  python experiments/joint_benchmark.py --out=/tmp/jb_select --seeds=0,1,2,3 \\
      --variants='[{"name":"lr3e-4","gen_lr":3e-4,"aux_lr":1e-3}]'
  python experiments/joint_benchmark.py --out=/tmp/jb_report --seeds=100,101,102,103,104,105
  python experiments/joint_benchmark.py --out=/tmp/jb_report --render   # the table so far

The floor column is the TV of an i.i.d. sample of the truth as large as the scored rows; in
brackets the training sample's own TV (what a teacher that learned the data exactly would show).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dimo_jax.data import joints  # noqa: E402  pylint: disable=wrong-import-position

SAMPLERS = ("confidence", "ancestral")


def _cli(mode: str, workdir: str, data: str, extra, log_path: str) -> float:
  """Runs ``python -m dimo_jax.main`` with ``configs/tokens.py``; returns the wall time."""
  cmd = [sys.executable, "-m", "dimo_jax.main", "--config=" + os.path.join(ROOT, "configs", "tokens.py"),
         f"--workdir={workdir}", f"--config.mode={mode}", f"--config.data.path={data}", *extra]
  start = time.time()
  with open(log_path, "w") as log:
    log.write(" ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{mode} failed (exit {proc.returncode}), log {log_path}:\n{tail}")
  return time.time() - start


def _override(key: str, value) -> str:
  if isinstance(value, (list, tuple)):
    value = "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return f"--config.distill.{key}={value}"


def _score(joint, tokens: np.ndarray) -> dict:
  div = joints.diversity(joint, tokens)
  return {"tv": joints.tv_distance(joint, tokens), "distinct": div["distinct"], "entropy": div["entropy"],
          "top_share": div["top_share"]}


def _teacher_rows(workdir: str, joint, num: int, seed: int) -> list:
  import jax  # pylint: disable=import-outside-toplevel
  from dimo_jax.core import samplers  # pylint: disable=import-outside-toplevel
  from dimo_jax.networks import conditioning  # pylint: disable=import-outside-toplevel
  from dimo_jax.storage import loaders  # pylint: disable=import-outside-toplevel
  model, params, _ = loaders.load_teacher(workdir)
  apply_fn = conditioning.make_apply_fn(model)
  labels = np.full((num,), model.null_label if model.has_null_class else 0, np.int32)
  rows = []
  for sampler in SAMPLERS:
    fn = samplers.confidence_sampler if sampler == "confidence" else samplers.ancestral_sampler
    for steps in range(1, joint.seq_len + 1):
      # The parameters are an argument (closed over, XLA would fold them into the program).
      run = jax.jit(lambda p, k, l, fn=fn, steps=steps: fn(apply_fn, p, k, l, seq_len=model.seq_len,
                                                          codebook_size=model.codebook_size, steps=steps))
      tokens = np.asarray(run(params, jax.random.key(seed + steps), labels))
      rows.append(dict(sampler=sampler, steps=steps, **_score(joint, tokens)))
  return rows


def _generator_row(workdir: str, joint, num: int, seed: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from dimo_jax.core import samplers  # pylint: disable=import-outside-toplevel
  from dimo_jax.storage import loaders  # pylint: disable=import-outside-toplevel
  model, params, stored = loaders.load_generator(workdir)
  ec = stored.get("evaluate", {})  # the one-step sampling settings mode=evaluate uses
  r_init, sigma = float(ec.get("r_init", 0.6)), float(ec.get("sigma", 0.1))
  labels = np.full((num,), model.null_label if model.has_null_class else 0, np.int32)
  gen = jax.jit(lambda p, k, l: samplers.one_step_generate(model, p, k, l, r_init=r_init, sigma=sigma))
  return _score(joint, np.asarray(gen(params, jax.random.key(seed + 101), labels)))


def _log_stats(log_path: str) -> dict:
  """NaN counts and the last logged divergence from a distillation log."""
  text = open(log_path).read()
  nans = [float(x) for x in re.findall(r"gen/nan_count=([0-9.eE+-]+|nan)", text)]
  divs = [float(x) for x in re.findall(r"gen/token_divergence=([0-9.eE+-]+|nan)", text)]
  return {"nan_count": float(np.nansum(nans)) if nans else 0.0,
          "finite": bool(all(np.isfinite(divs))) if divs else True,
          "last_divergence": divs[-1] if divs else None}


def _teacher_log(log_path: str) -> dict:
  text = open(log_path).read()
  out = {}
  m = re.findall(r"Teacher training finished at step (\d+)", text)
  if m:
    out["teacher_steps"] = int(m[-1])
  out["structure_warnings"] = len(re.findall(r"breaks structure", text))
  return out


def run_joint(seed: int, args, variants) -> list:
  """Teacher (cached), its rows (cached) and every variant (cached) on the joint of ``seed``."""
  name, joint = joints.draw_joint(seed, args.family, args.vocab_size, args.seq_len)
  folder = os.path.join(args.out, name)
  os.makedirs(folder, exist_ok=True)
  data = os.path.join(folder, "tokens.npy")
  if not os.path.exists(data):
    np.save(data, joint.sample(np.random.default_rng([seed, 1]), args.train_size))
  teacher_dir = os.path.join(folder, "teacher")
  teacher_json = os.path.join(folder, "teacher_rows.json")
  if os.path.exists(teacher_json):
    with open(teacher_json) as f:
      teacher = json.load(f)
  else:
    log = os.path.join(folder, "teacher.log")
    seconds = _cli("teacher", teacher_dir, data, args.teacher_args, log)
    rows = _teacher_rows(teacher_dir, joint, args.num_samples, seed)
    teacher = dict(rows=rows, seconds=seconds, **_teacher_log(log))
    with open(teacher_json, "w") as f:
      json.dump(teacher, f)
  floor = joints.sampling_floor(joint, args.num_samples, seed=seed + 7)
  data_floor = joints.tv_distance(joint, np.load(data))  # the training sample's own distance
  best = min(teacher["rows"], key=lambda r: r["tv"])
  one = {s: next(r for r in teacher["rows"] if r["sampler"] == s and r["steps"] == 1)["tv"] for s in SAMPLERS}
  truth_top = float(joint.probs.max())
  results = []
  for variant in variants:
    vname = variant.get("name", "defaults")
    out_json = os.path.join(folder, f"run_{vname}.json")
    if os.path.exists(out_json):
      with open(out_json) as f:
        results.append(json.load(f))
      continue
    workdir = os.path.join(folder, f"distill_{vname}")
    log = os.path.join(folder, f"distill_{vname}.log")
    extra = [f"--config.teacher.checkpoint={teacher_dir}", "--config.distill.evaluate_at_end=False",
             *args.distill_args, *(_override(k, v) for k, v in variant.items() if k != "name")]
    seconds = _cli("distill", workdir, data, extra, log)
    gen = _generator_row(workdir, joint, args.num_samples, seed)
    row = dict(joint=name, seed=seed, variant=vname, vocab_size=joint.vocab_size, seq_len=joint.seq_len,
               support=int((joint.probs > 0).sum()), floor=floor, data_floor=data_floor, truth_top_share=truth_top,
               teacher_one_confidence=one["confidence"], teacher_one_ancestral=one["ancestral"],
               teacher_best=best["tv"], teacher_best_row=f"{best['sampler']} {best['steps']}",
               teacher_train_steps=teacher.get("teacher_steps"),
               structure_warnings=teacher.get("structure_warnings"),
               generator=gen["tv"], ratio=gen["tv"] / max(best["tv"], 1e-12),
               generator_distinct=gen["distinct"], generator_top_share=gen["top_share"],
               collapsed=bool(gen["top_share"] > max(0.5, 2 * truth_top)), distill_seconds=seconds,
               **_log_stats(log))
    with open(out_json, "w") as f:
      json.dump(row, f)
    results.append(row)
  return results


def table(results: list) -> str:
  """The markdown table of a list of run rows, then the summary per variant."""
  head = ("| joint | variant | V^L (support) | floor (data) | teacher 1 step (conf / anc) | teacher best (row) | "
          "generator 1 step | ratio | top share (truth) | NaN |")
  lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(
        f"| {r['joint']} | {r['variant']} | {r['vocab_size'] ** r['seq_len']} ({r['support']}) | {r['floor']:.4f} "
        f"({r.get('data_floor', float('nan')):.3f}) | "
        f"{r['teacher_one_confidence']:.3f} / {r['teacher_one_ancestral']:.3f} | {r['teacher_best']:.4f} "
        f"({r['teacher_best_row']}) | {r['generator']:.4f} | {r['ratio']:.2f}x | "
        f"{r['generator_top_share']:.3f} ({r['truth_top_share']:.3f}) | {r['nan_count']:g} |")
  lines.append("")
  for v in sorted({r["variant"] for r in results}):
    ratios = np.array([r["ratio"] for r in results if r["variant"] == v])
    within = int((ratios <= 1.5).sum())
    lines.append(f"- {v}: {len(ratios)} joints, median ratio {np.median(ratios):.2f}x, worst {ratios.max():.2f}x, "
                 f"mean {ratios.mean():.2f}x, {within}/{len(ratios)} within 1.5x.")
  return "\n".join(lines) + "\n"


def render(out: str) -> list:
  """The table of every run recorded in ``<out>/results.jsonl`` (the last record of a run wins)."""
  runs = {}
  with open(os.path.join(out, "results.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "data_floor" not in r:
        _, joint = joints.draw_joint(r["seed"], r["joint"].split("_v")[0], r["vocab_size"], r["seq_len"])
        r["data_floor"] = joints.tv_distance(joint, np.load(os.path.join(out, r["joint"], "tokens.npy")))
      runs[(r["joint"], r["variant"])] = r
  results = list(runs.values())
  print(table(results))
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", default="0,1,2,3", help="comma-separated joint seeds")
  p.add_argument("--variants", default='[{"name":"defaults"}]',
                 help="JSON list of config.distill overrides, each with a name")
  p.add_argument("--family", default="", help="one family for every seed (default: cycle through them)")
  p.add_argument("--vocab_size", type=int, default=0, help="one vocabulary size (default: drawn)")
  p.add_argument("--seq_len", type=int, default=0, help="one sequence length (default: drawn)")
  p.add_argument("--train_size", type=int, default=5000, help="training sequences per joint")
  p.add_argument("--num_samples", type=int, default=20000, help="samples per scored row")
  p.add_argument("--teacher_args", default="", help="extra teacher flags (space separated), e.g. for a tiny run")
  p.add_argument("--distill_args", default="", help="extra distill flags (space separated)")
  p.add_argument("--render", action="store_true", help="only print the table of <out>/results.jsonl")
  args = p.parse_args(argv)
  if args.render:
    return render(args.out)
  args.teacher_args = args.teacher_args.split()
  args.distill_args = args.distill_args.split()
  variants = json.loads(args.variants)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
    rows = run_joint(seed, args, variants)
    results.extend(rows)
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "table.md"), "w") as f:
      f.write(table(results))
    print(table(rows), flush=True)
  text = table(results)
  print(text)
  return results


if __name__ == "__main__":
  main()
