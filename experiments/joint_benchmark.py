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
   variant's ``config.distill`` overrides) and scores the EMA generator the same way at 1, 2 and
   4 generator steps (``--generator_steps``; ``core.generator_steps.generate`` with the run's
   ``generator_schedule``), with its diversity, its most frequent sequence's share (collapse) and
   its NaN count. A variant may train a k-step generator (``"generator_steps": 2``).

Results are appended to ``<out>/results.jsonl`` as each run finishes and the table is rewritten
to ``<out>/table.md`` (partial tables exist while it runs). Teachers and finished runs are
reused by a rerun.

  python experiments/joint_benchmark.py --out=/tmp/jb_select --seeds=0,1,2,3
  python experiments/joint_benchmark.py --out=/tmp/jb_select --seeds=0,1,2,3 \\
      --variants='[{"name":"lr3e-4","gen_lr":3e-4,"aux_lr":1e-3}]'
  python experiments/joint_benchmark.py --out=/tmp/jb_report --seeds=100,101,102,103,104,105
  python experiments/joint_benchmark.py --out=/tmp/jb_select --seeds=5 \\
      --variants='[{"name":"k2","generator_steps":2,"generator_schedule":"linear"}]'
  python experiments/joint_benchmark.py --out=/tmp/jb_report --render   # the table so far

A variant's ``config.distill`` keys that ``configs/tokens.py`` does not carry are set by a small
config file written next to the run (``<joint>/config_<variant>.py``, importing
``configs/tokens.py``); the others pass as ``--config.distill.<key>=<value>``.

The floor column is the TV of an i.i.d. sample of the truth as large as the scored rows; in
brackets the training sample's own TV (what a teacher that learned the data exactly would show).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dimo_jax.data import joints  # noqa: E402  pylint: disable=wrong-import-position

SAMPLERS = ("confidence", "ancestral")


TOKENS_CONFIG = os.path.join(ROOT, "configs", "tokens.py")


def _cli(mode: str, workdir: str, data: str, extra, log_path: str, config: str = TOKENS_CONFIG) -> tuple:
  """Runs ``python -m dimo_jax.main`` with ``configs/tokens.py`` (or ``config``); returns ``(wall, cpu)``
  seconds, the CPU time being the child's user + system time (the comparable number on a loaded host)."""
  cmd = [sys.executable, "-m", "dimo_jax.main", "--config=" + config,
         f"--workdir={workdir}", f"--config.mode={mode}", f"--config.data.path={data}", *extra]
  start, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(log_path, "w") as log:
    log.write(" ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{mode} failed (exit {proc.returncode}), log {log_path}:\n{tail}")
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.time() - start, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _override(key: str, value) -> str:
  if isinstance(value, (list, tuple)):
    value = "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return f"--config.distill.{key}={value}"


def _split_variant(variant: dict):
  """``(flags, new_keys)``: overrides of keys ``configs/tokens.py`` carries, and the keys it lacks."""
  sys.path.insert(0, ROOT)
  from configs import tokens  # pylint: disable=import-outside-toplevel
  known = set(tokens.get_config().distill.keys())
  items = [(k, v) for k, v in variant.items() if k != "name"]
  return [_override(k, v) for k, v in items if k in known], {k: v for k, v in items if k not in known}


def _variant_config(path: str, new_keys: dict) -> str:
  """Writes (atomically) a config file: ``configs/tokens.py`` plus ``new_keys`` in ``config.distill``."""
  for key, value in new_keys.items():
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not isinstance(value, (int, float, str, list, tuple)):
      raise ValueError(f"variant key {key!r}={value!r}: give a name and a number, string or list")
  lines = ['"""configs/tokens.py with config.distill keys it does not carry (experiments/joint_benchmark.py)."""',
           "import importlib.util", "",
           f"_SPEC = importlib.util.spec_from_file_location('dimo_configs_tokens', {TOKENS_CONFIG!r})",
           "_BASE = importlib.util.module_from_spec(_SPEC)", "_SPEC.loader.exec_module(_BASE)", "", "",
           "def get_config():", "  c = _BASE.get_config()",
           *(f"  c.distill.{k} = {tuple(v) if isinstance(v, list) else v!r}" for k, v in new_keys.items()),
           "  return c", ""]
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  return path


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


def _generator_rows(workdir: str, joint, num: int, seed: int, step_counts) -> dict:
  """Scores of the EMA generator at each count of ``step_counts`` (same keys at every count)."""
  import jax  # pylint: disable=import-outside-toplevel
  from dimo_jax.core import generator_steps  # pylint: disable=import-outside-toplevel
  from dimo_jax.storage import loaders  # pylint: disable=import-outside-toplevel
  model, params, stored = loaders.load_generator(workdir)
  ec = stored.get("evaluate", {})  # the one-step sampling settings mode=evaluate uses
  r_init, sigma = float(ec.get("r_init", 0.6)), float(ec.get("sigma", 0.1))
  schedule = stored.get("distill", {}).get("generator_schedule", "linear")
  schedule = schedule if isinstance(schedule, str) else tuple(schedule)
  labels = np.full((num,), model.null_label if model.has_null_class else 0, np.int32)
  apply_fn = generator_steps.model_apply_fn(model, sigma)
  rows = {}
  for steps in step_counts:
    if not isinstance(schedule, str) and len(schedule) != steps - 1:
      continue  # an explicit schedule serves its own step count only
    gen = jax.jit(lambda p, k, l, steps=steps: generator_steps.generate(
        apply_fn, p, k, l, steps=steps, schedule=schedule, seq_len=model.seq_len,
        codebook_size=model.codebook_size, r_init=r_init))
    rows[str(steps)] = _score(joint, np.asarray(gen(params, jax.random.key(seed + 101), labels)))
  return rows


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
  out["structure_warnings"] = len(re.findall(r"samples breaks? structure", text))  # mode=teacher's warning lines
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
    seconds, cpu = _cli("teacher", teacher_dir, data, args.teacher_args, log)
    rows = _teacher_rows(teacher_dir, joint, args.num_samples, seed)
    teacher = dict(rows=rows, seconds=seconds, cpu_seconds=cpu, **_teacher_log(log))
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
    flags, new_keys = _split_variant(variant)
    config = _variant_config(os.path.join(folder, f"config_{vname}.py"), new_keys) if new_keys else TOKENS_CONFIG
    extra = [f"--config.teacher.checkpoint={teacher_dir}", "--config.distill.evaluate_at_end=False",
             *args.distill_args, *flags]
    seconds, cpu = _cli("distill", workdir, data, extra, log, config)
    by_steps = _generator_rows(workdir, joint, args.num_samples, seed, args.generator_steps)
    gen = by_steps.get("1") or next(iter(by_steps.values()))
    row = dict(joint=name, seed=seed, variant=vname, vocab_size=joint.vocab_size, seq_len=joint.seq_len,
               support=int((joint.probs > 0).sum()), floor=floor, data_floor=data_floor, truth_top_share=truth_top,
               teacher_one_confidence=one["confidence"], teacher_one_ancestral=one["ancestral"],
               teacher_best=best["tv"], teacher_best_row=f"{best['sampler']} {best['steps']}",
               teacher_train_steps=teacher.get("teacher_steps"),
               structure_warnings=teacher.get("structure_warnings"),
               generator_steps=int(variant.get("generator_steps", 1)),
               generator=gen["tv"], ratio=gen["tv"] / max(best["tv"], 1e-12),
               by_steps={k: dict(v, ratio=v["tv"] / max(best["tv"], 1e-12)) for k, v in by_steps.items()},
               generator_distinct=gen["distinct"], generator_top_share=gen["top_share"],
               collapsed=bool(gen["top_share"] > max(0.5, 2 * truth_top)), distill_seconds=seconds,
               distill_cpu_seconds=cpu,
               **_log_stats(log))
    with open(out_json, "w") as f:
      json.dump(row, f)
    results.append(row)
  return results


def _at(r: dict, steps: int):
  """The row's score at ``steps`` generator steps (the 1-step columns of rows made before them)."""
  found = r.get("by_steps", {}).get(str(steps))
  if found is None and steps == 1:
    found = {"tv": r["generator"], "ratio": r["ratio"]}
  return found


def table(results: list, step_counts=(1, 2, 4)) -> str:
  """The markdown table of a list of run rows, then the summary per variant and step count."""
  more = [k for k in step_counts if k != 1]
  head = ("| joint | variant | V^L (support) | floor (data) | teacher 1 step (conf / anc) | teacher best (row) | "
          "generator 1 step | ratio | " + "".join(f"{k} steps (ratio) | " for k in more)
          + "top share (truth) | NaN |")
  lines = [head, "|---" * (10 + len(more)) + "|"]
  for r in results:
    cells = []
    for k in more:
      at = _at(r, k)
      cells.append("-" if at is None else f"{at['tv']:.4f} ({at['ratio']:.2f}x)")
    lines.append(
        f"| {r['joint']} | {r['variant']} | {r['vocab_size'] ** r['seq_len']} ({r['support']}) | {r['floor']:.4f} "
        f"({r.get('data_floor', float('nan')):.3f}) | "
        f"{r['teacher_one_confidence']:.3f} / {r['teacher_one_ancestral']:.3f} | {r['teacher_best']:.4f} "
        f"({r['teacher_best_row']}) | {r['generator']:.4f} | {r['ratio']:.2f}x | " + "".join(c + " | " for c in cells)
        + f"{r['generator_top_share']:.3f} ({r['truth_top_share']:.3f}) | {r['nan_count']:g} |")
  lines.append("")
  for v in sorted({r["variant"] for r in results}):
    for k in step_counts:
      ratios = np.array([_at(r, k)["ratio"] for r in results if r["variant"] == v and _at(r, k) is not None])
      if not len(ratios):
        continue
      lines.append(f"- {v}, {k} step{'s' if k > 1 else ''}: {len(ratios)} joints, median ratio {np.median(ratios):.2f}x, "
                   f"worst {ratios.max():.2f}x, mean {ratios.mean():.2f}x, {int((ratios <= 1.1).sum())}/{len(ratios)} "
                   f"within 1.1x, {int((ratios <= 1.5).sum())}/{len(ratios)} within 1.5x.")
  return "\n".join(lines) + "\n"


def render(out: str, step_counts=(1, 2, 4)) -> list:
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
  print(table(results, step_counts))
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
  p.add_argument("--generator_steps", default="1,2,4", help="generator step counts scored for every run")
  p.add_argument("--render", action="store_true", help="only print the table of <out>/results.jsonl")
  args = p.parse_args(argv)
  args.generator_steps = [int(k) for k in args.generator_steps.split(",") if k.strip()]
  if not args.generator_steps or min(args.generator_steps) < 1:
    raise SystemExit(f"--generator_steps={args.generator_steps}: give step counts >= 1, e.g. 1,2,4")
  if args.render:
    return render(args.out, args.generator_steps)
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
      f.write(table(results, args.generator_steps))
    print(table(rows, args.generator_steps), flush=True)
  text = table(results, args.generator_steps)
  print(text)
  return results


if __name__ == "__main__":
  main()
