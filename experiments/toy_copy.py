"""Di[M]O on the exact copy pair: (x, x) with x uniform over V values, analytic teacher.

The teacher is ``exact.ExactConditionalTeacher`` (no training). Its one parallel step from all
masks draws the two tokens independently (they agree 1/V of the time); a good one-step generator
makes them agree always while the first token stays uniform (entropy log V). The student
(generator and auxiliary) starts from random weights or from a small MDM pre-trained on samples
of the truth (loss on masked positions, or on all positions). One compiled step serves all seeds.

  python experiments/toy_copy.py --out=/tmp/copy                                 # recommended
  python experiments/toy_copy.py --out=/tmp/copy --aux_updates=1 --aux_lr=1e-3   # unstable
  python experiments/toy_copy.py --out=/tmp/copy --init=random --steps=1000

Prints a markdown table (agreement, first-token entropy in units of log V, exact TV) and writes
``copy_results.json`` to ``--out``.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import digits  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.core import samplers
from dimo_jax.data import joints
from dimo_jax.method import dimo, mdm
from dimo_jax.networks import exact, maskgit


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--vocab", type=int, default=8)
  p.add_argument("--init", default="masked", choices=("random", "masked", "all"),
                 help="student init: random weights, or MDM pre-training with the loss on masked / all positions")
  p.add_argument("--pretrain_steps", type=int, default=100)
  p.add_argument("--pretrain_lr", type=float, default=3e-3)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--depth", type=int, default=1)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--eval_every", type=int, default=50)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--gen_lr", type=float, default=1e-3)
  p.add_argument("--aux_lr", type=float, default=3e-3)
  p.add_argument("--aux_updates", type=int, default=4)
  p.add_argument("--r_init", default="fix_0.6")
  p.add_argument("--sigma", type=float, default=0.1)
  p.add_argument("--divergence", default="fkl")
  p.add_argument("--beta", type=float, default=0.0)
  p.add_argument("--normalization", default="batch", choices=("batch", "masked"))
  p.add_argument("--ema_decay", type=float, default=0.99)
  p.add_argument("--aux_label_smoothing", type=float, default=0.1)
  p.add_argument("--freeze", default="", help="comma-separated parameter names kept fixed (e.g. tok_emb,pos_emb,out_bias)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--num_samples", type=int, default=4000)
  return p.parse_args(argv)


def stats(joint, x) -> dict:
  x = np.asarray(x)
  return {"agree": float((x[:, 0] == x[:, 1]).mean()), "entropy": joints.position_entropy(x, joint.vocab_size),
          "tv": joints.tv_distance(joint, x)}


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  v = args.vocab
  joint = joints.copy_pair(v)
  teacher = exact.exact_teacher(joint)
  model = maskgit.MaskTransformer(codebook_size=v, seq_len=2, num_classes=0, width=args.width, depth=args.depth,
                                 heads=2, mlp_dim=2 * args.width, scan=False)
  n = args.num_samples
  labels = jnp.zeros((n,), jnp.int32)
  apply_t = lambda params, tokens, lab: teacher.apply({}, tokens, lab)
  rows = []
  for steps in (1, 2):
    x = samplers.confidence_sampler(apply_t, {}, jax.random.key(steps), labels, seq_len=2, codebook_size=v,
                                    steps=steps)
    rows.append({"model": f"exact teacher, confidence sampler {steps} step(s)", **stats(joint, x)})
  rows.append({"model": "truth sample (floor)", **stats(joint, joint.sample(np.random.default_rng(0), n))})

  cfg = digits.get_config()
  d = cfg.distill
  d.batch_size, d.gen_lr, d.aux_lr, d.aux_updates = args.batch_size, args.gen_lr, args.aux_lr, args.aux_updates
  d.warmup_steps, d.ema_decay, d.r_init, d.sigma = 10, args.ema_decay, args.r_init, args.sigma
  d.divergence, d.beta, d.normalization = args.divergence, args.beta, args.normalization
  d.aux_label_smoothing = args.aux_label_smoothing
  d.freeze = tuple(x for x in args.freeze.split(",") if x)
  dist = dimo.build_distiller(cfg, model, teacher_model=teacher)
  r_eval = float(str(args.r_init).split("_")[-1])
  generate = jax.jit(lambda p, k: samplers.one_step_generate(model, p, k, labels, r_init=r_eval, sigma=args.sigma))

  step = None
  runs = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    key = jax.random.key(seed)
    if args.init == "random":
      student = maskgit.init_params(model, key)
    else:
      student = mdm.pretrain_copy_mdm(model, key, args.pretrain_steps, loss_on=args.init, lr=args.pretrain_lr)
    state = dist.init_state({}, seed, student_params=student)
    if step is None:
      step, state = dist.jit_step(state)
    init = stats(joint, generate(state.gen.params, jax.random.key(99)))
    curve = [{"step": 0, **init}]
    t0 = time.time()
    for i in range(args.steps):
      state, _ = step(state)
      if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
        point = {"step": i + 1, **stats(joint, generate(state.gen.params, jax.random.key(99)))}
        curve.append(point)
        print(f"seed {seed} step {i + 1}: agree {point['agree']:.3f} entropy {point['entropy']:.3f} "
              f"tv {point['tv']:.3f}", flush=True)
    final = stats(joint, generate(state.gen.params, jax.random.key(7)))
    ema = stats(joint, generate(state.ema_params, jax.random.key(7)))
    runs.append({"seed": seed, "init": init, "final": final, "ema": ema, "curve": curve,
                 "seconds": time.time() - t0})
    rows.append({"model": f"student init (seed {seed})", **init})
    rows.append({"model": f"Di[M]O generator, {args.steps} steps (seed {seed})", **final})
    rows.append({"model": f"Di[M]O generator EMA (seed {seed})", **ema})

  lines = [f"Copy pair, V={v}, {n} samples per row; entropy of the first token in units of log V.", "",
           "| model | agreement | first-token entropy | TV |", "|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['agree']:.3f} | {r['entropy']:.3f} | {r['tv']:.3f} |" for r in rows]
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(args.out, "copy_results.json"), "w") as f:
    json.dump({"args": vars(args), "rows": rows, "runs": runs}, f, indent=1)
  return rows, runs


if __name__ == "__main__":
  main()
