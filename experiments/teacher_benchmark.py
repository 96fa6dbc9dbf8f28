"""The teacher that ``configs/tokens.py`` trains with no flags, on joints with global constraints.

Each seed draws one joint with exact probabilities (``data.joints.draw_global_joint``: the last
position a weighted sum of the others, sequences sorted under a permuted order of the values, the
last position a count of one value, fixed counts of every value, and a Markov-chain mixture; L 6
to 8, V 3 to 5). For each joint the script

1. writes i.i.d. samples to ``<out>/<joint>/tokens.npy``, ``--train_size`` of them for training
   after the data's validation split;
2. trains a teacher through the command line (``python -m dimo_jax.main
   --config=configs/tokens.py --config.mode=teacher``, the data path and ``--teacher_args`` only),
   recording its wall time, the CPU time (user + sys) of the process and the load average;
3. scores it at every step count 1..L with both samplers by the exact TV of ``--num_samples``
   samples to the truth (``experiments/joint_benchmark.py``'s scoring) next to the floor, an
   i.i.d. sample of the truth of the same size, and reads its ``teacher_report.json``.

Rows go to ``<out>/results.jsonl`` and the table to ``<out>/table.md``; a finished joint is reused.

  python experiments/teacher_benchmark.py --out=/tmp/tb_select --seeds=0,1
  python experiments/teacher_benchmark.py --out=/tmp/tb_report --seeds=5,6,7,8,9
  python experiments/teacher_benchmark.py --out=/tmp/tb_report --render
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import joint_benchmark as jb  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.data import joints  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.storage import checkpoints  # noqa: E402  pylint: disable=wrong-import-position

GOAL = 3.0  # the teacher's best TV within this multiple of the floor


def _val_fraction() -> float:
  from configs import tokens  # pylint: disable=import-outside-toplevel
  return float(tokens.get_config().data.get("val_fraction", 0.1))


def run_joint(seed: int, args) -> dict:
  """Teacher and its scores on the joint of ``seed`` (cached in ``<out>/<joint>/row.json``)."""
  name, joint = joints.draw_global_joint(seed, args.family)
  folder = os.path.join(args.out, name + (f"_{args.tag}" if args.tag else ""))
  row_json = os.path.join(folder, "row.json")
  if os.path.exists(row_json):
    with open(row_json) as f:
      return json.load(f)
  os.makedirs(folder, exist_ok=True)
  data = os.path.join(folder, "tokens.npy")
  total = int(round(args.train_size / (1.0 - _val_fraction())))
  if not os.path.exists(data):
    np.save(data, joint.sample(np.random.default_rng([seed, 1]), total))
  teacher_dir, log = os.path.join(folder, "teacher"), os.path.join(folder, "teacher.log")
  run = _train(teacher_dir, data, log, args)
  scores_json = os.path.join(folder, "scores.json")
  if os.path.exists(scores_json):
    with open(scores_json) as f:
      rows = json.load(f)
  else:
    rows = jb._teacher_rows(teacher_dir, joint, args.num_samples, seed)  # pylint: disable=protected-access
    _write_json(scores_json, rows)
  with open(os.path.join(teacher_dir, "teacher_report.json")) as f:
    report = json.load(f)
  with open(os.path.join(teacher_dir, "config.json")) as f:
    stored = json.load(f)
  floor = joints.sampling_floor(joint, args.num_samples, seed=seed + 7)
  best = min(rows, key=lambda r: r["tv"])
  row = dict(joint=name, seed=seed, tag=args.tag, vocab_size=joint.vocab_size, seq_len=joint.seq_len,
             support=int((joint.probs > 0).sum()), train_size=args.train_size, floor=floor,
             teacher_best=best["tv"], teacher_best_row=f"{best['sampler']} {best['steps']}",
             ratio=best["tv"] / floor, rows=rows, wall_minutes=run["wall"] / 60,
             cpu_minutes=None if run["cpu"] is None else run["cpu"] / 60, cpu_source=run["source"],
             load=run["load"], width=stored["model"]["width"], depth=stored["model"]["depth"],
             steps_budget=stored["train"]["steps"], worst_broken=report.get("worst_broken"),
             gap=report.get("gap"), bound=report.get("val_nll_bound"), plugin=report["baselines"]["plugin"],
             far=report.get("far"), next_budget=report.get("next_budget"), teacher_args=" ".join(args.teacher_args),
             **jb._teacher_log(log))  # pylint: disable=protected-access
  _write_json(row_json, row)
  return row


def _write_json(path: str, value) -> None:
  checkpoints.write_config(os.path.dirname(path), value, filename=os.path.basename(path))


def _log_span(log: str) -> float:
  """Seconds between the first and the last timestamped line of a teacher log."""
  import datetime  # pylint: disable=import-outside-toplevel
  stamps = []
  with open(log) as f:
    for line in f:
      try:
        stamps.append(datetime.datetime.strptime(line[:8], "%H:%M:%S"))
      except ValueError:
        continue
  return (stamps[-1] - stamps[0]).total_seconds() % 86400 if len(stamps) > 1 else float("nan")


def _train(teacher_dir: str, data: str, log: str, args) -> dict:
  """Trains the teacher once; its wall and CPU seconds and the load are kept in ``teacher_run.json``
  next to it. A teacher finished by a run that did not record them takes its CPU seconds from
  ``--cpu_watch`` (a poller's ``{workdir: {"cpu": seconds}}`` of /proc times) and its wall time from
  the log's first and last timestamps."""
  path = os.path.join(os.path.dirname(teacher_dir), "teacher_run.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  if os.path.exists(os.path.join(teacher_dir, "teacher_report.json")):
    watched = {}
    if args.cpu_watch and os.path.exists(args.cpu_watch):
      with open(args.cpu_watch) as f:
        watched = json.load(f)
    entry = watched.get(teacher_dir)
    run = dict(wall=_log_span(log), cpu=entry["cpu"] if entry else None, load=[None, None],
               source="poller" if entry else "not recorded")
  else:
    load_before = os.getloadavg()[0]
    wall, cpu = jb._cli("teacher", teacher_dir, data, args.teacher_args, log)  # pylint: disable=protected-access
    run = dict(wall=wall, cpu=cpu, load=[load_before, os.getloadavg()[0]], source="process")
  _write_json(path, run)
  return run


def _num(value, fmt: str) -> str:
  return "-" if value is None or value != value else format(value, fmt)


def table(results: list) -> str:
  """The markdown table of run rows and the goal line."""
  lines = ["| joint | V^L (support) | model (steps trained / budget) | floor | teacher best (row) | ratio | "
           "worst rule broken | bound - plug-in | CPU min | wall min | load |",
           "|---" * 11 + "|"]
  for r in results:
    broken = "-" if r["worst_broken"] is None else f"{r['worst_broken']:.1%}"
    gap = "-" if r["gap"] is None else f"{r['gap']:.3f}"
    name = r["joint"] + (" " + r["tag"] if r.get("tag") else "")
    lines.append(
        f"| {name} | {r['vocab_size'] ** r['seq_len']} ({r['support']}) | "
        f"{r['width']} x {r['depth']} ({r.get('teacher_steps')} / {r['steps_budget']}) | {r['floor']:.4f} | "
        f"{r['teacher_best']:.4f} ({r['teacher_best_row']}) | {r['ratio']:.2f}x | {broken} | {gap} | "
        f"{_num(r['cpu_minutes'], '.1f')} | {_num(r['wall_minutes'], '.1f')} | {_num(r['load'][0], '.1f')} / "
        f"{_num(r['load'][1], '.1f')} |")
  if results:
    ratios = np.array([r["ratio"] for r in results])
    cpu = np.array([r["cpu_minutes"] for r in results if r["cpu_minutes"] is not None] or [np.nan])
    lines += ["", f"- {len(ratios)} joints: median ratio {np.median(ratios):.2f}x, worst {ratios.max():.2f}x, "
                  f"{int((ratios <= GOAL).sum())}/{len(ratios)} within {GOAL:g}x of the floor; CPU minutes "
                  f"{cpu.min():.1f} to {cpu.max():.1f}, {int((cpu <= 15).sum())}/{len(cpu)} within 15."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", default="5,6,7,8,9", help="comma-separated joint seeds")
  p.add_argument("--family", default="", help="one family for every seed (default: cycle through them)")
  p.add_argument("--train_size", type=int, default=50000, help="training sequences per joint")
  p.add_argument("--num_samples", type=int, default=20000, help="samples per scored row and the floor")
  p.add_argument("--teacher_args", default="", help="extra teacher flags (space separated)")
  p.add_argument("--tag", default="", help="a name for runs with --teacher_args (its own folders)")
  p.add_argument("--cpu_watch", default="", help="CPU seconds of teachers trained without this script's record")
  p.add_argument("--render", action="store_true", help="only print the table of <out>/results.jsonl")
  args = p.parse_args(argv)
  path = os.path.join(args.out, "results.jsonl")
  if args.render:
    with open(path) as f:
      runs = {(r["joint"], r.get("tag", "")): r for r in map(json.loads, f)}
    print(table(list(runs.values())))
    return list(runs.values())
  args.teacher_args = args.teacher_args.split()
  os.makedirs(args.out, exist_ok=True)
  results = []
  for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
    row = run_joint(seed, args)
    results.append(row)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
    with open(os.path.join(args.out, "table.md"), "w") as f:
      f.write(table(results))
    print(table([row]), flush=True)
  print(table(results))
  return results


if __name__ == "__main__":
  main()
