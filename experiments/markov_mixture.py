"""Di[M]O on a known joint: a mixture of Markov chains, scored by exact total-variation distance.

The truth is ``joints.markov_mixture`` (default: 7 positions, 4 values, 3 chains; 16,384
sequences). A teacher MDM is trained by this project's train step (``mdm.make_train_step``)
on fresh samples from the truth, then distilled into a one-step generator with
``dimo.build_distiller``. Every sampler is scored by the exact TV distance between the
empirical law of ``--num_samples`` samples and the truth, set against the floor: the TV of an
equally large i.i.d. sample from the truth itself.

  python experiments/markov_mixture.py --out=/tmp/markov
  python experiments/markov_mixture.py --out=/tmp/markov --variants='[{"name": "r1", "r_init": "fix_1.0"}]'

Each variant is a dict of ``config.distill`` overrides (plus ``name``); all variants start from
the same teacher. Prints a markdown table and writes ``results_<variant names>.json`` and ``.md`` to
``--out`` (the teacher parameters and its rows are cached there, keyed by the teacher settings).
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

from configs import tokens as tokens_config  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.core import samplers
from dimo_jax.data import joints
from dimo_jax.method import dimo, mdm
from dimo_jax.networks import conditioning, exact, maskgit

# The recommended distillation settings for this joint (docs/proofs.md); variants override them.
DEFAULT_DISTILL = {
    "steps": 3000,
    "batch_size": 128,
    "gen_lr": 3e-4,
    "gen_lr_schedule": "constant",
    "aux_lr": 1e-3,
    "aux_updates": 4,
    "warmup_steps": 100,
    "r_init": "fix_0.6",
    "sigma": 0.1,
    "divergence": "fkl",
    "beta": 0.0,
    "normalization": "batch",
    "mask_schedule": "arccos",
    "grad_input": "init",
    "ema_decay": 0.999,
    "aux_label_smoothing": 0.0,
    "freeze": ("tok_emb", "pos_emb", "out_bias"),
    "gen_grad_clip": 1.0,
    "gen_temp": 1.0,
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output folder (results_*.json / .md, teacher cache)")
  p.add_argument("--vocab", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=7)
  p.add_argument("--chains", type=int, default=3)
  p.add_argument("--joint_seed", type=int, default=0)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--teacher_steps", type=int, default=4000)
  p.add_argument("--teacher_batch", type=int, default=256)
  p.add_argument("--teacher_lr", type=float, default=1e-3)
  p.add_argument("--teacher_loss_on", default="all", choices=("all", "masked"))
  p.add_argument("--teacher_label_smoothing", type=float, default=0.0)
  p.add_argument("--num_samples", type=int, default=50000, help="samples per TV estimate")
  p.add_argument("--eval_every", type=int, default=1000, help="distillation steps between TV checks")
  p.add_argument("--diversity_samples", type=int, default=5000)
  p.add_argument("--teacher_rows", default="all", choices=("all", "ends", "none"),
                 help="teacher sampler rows: every step count 1..L, only 1 and L, or none")
  p.add_argument("--variants", default='[{"name": "default"}]',
                 help="JSON list of dicts of config.distill overrides, each with a 'name'")
  p.add_argument("--exact_teacher", action="store_true",
                 help="distil from the exact conditionals of the truth (exact.exact_teacher) instead of the "
                      "trained teacher; the students still start from the trained teacher's weights")
  p.add_argument("--seed", type=int, default=0, help="seed of the teacher's training (and of the distillation)")
  p.add_argument("--distill_seed", type=int, default=None,
                 help="seed of the distillation only (default: --seed); the cached teacher is kept")
  p.add_argument("--eval_temperatures", default="1.0",
                 help="comma-separated sampling temperatures of the final one-step rows (training uses gen_temp)")
  args = p.parse_args(argv)
  try:
    args.eval_temperatures = [float(t) for t in str(args.eval_temperatures).split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"--eval_temperatures={args.eval_temperatures!r}: pass comma-separated numbers, e.g. 1.0,0.8") from None
  if not args.eval_temperatures or min(args.eval_temperatures) <= 0:
    raise ValueError(f"--eval_temperatures={args.eval_temperatures}: pass positive numbers, e.g. 1.0,0.8")
  try:
    variants = json.loads(args.variants)
  except json.JSONDecodeError as e:
    raise ValueError(f"--variants is not valid JSON ({e}); pass e.g. '[{{\"name\": \"a\", \"gen_lr\": 1e-4}}]'")
  if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
    raise ValueError("--variants must be a JSON list of dicts of config.distill overrides")
  allowed = set(tokens_config.get_config().distill) | set(DEFAULT_DISTILL)
  for v in variants:
    unknown = set(v) - allowed - {"name"}
    if unknown:
      raise ValueError(f"--variants: unknown keys {sorted(unknown)}; allowed: the keys of config.distill "
                       f"(configs/digits.py) and 'name'")
  args.variants = variants
  return args


# ------------------------------------------------------------------------------------- scoring
def draw(fn, n: int, batch: int, key) -> np.ndarray:
  out = []
  for i in range(-(-n // batch)):
    out.append(np.asarray(fn(jax.random.fold_in(key, i), batch)))
  return np.concatenate(out)[:n]


# ------------------------------------------------------------------------------------- teacher
def train_teacher(args, joint, model):
  cfg = tokens_config.get_config().train
  cfg.steps = args.teacher_steps
  cfg.batch_size = args.teacher_batch
  cfg.lr = args.teacher_lr
  cfg.loss_on = args.teacher_loss_on
  cfg.label_smoothing = args.teacher_label_smoothing
  cfg.label_dropout = 0.0
  cfg.exact_mask = False
  settings = mdm.TeacherSettings.from_config(cfg)
  tx = settings.optimizer()
  step = jax.jit(mdm.make_train_step(
      model, tx, mask_id=joint.vocab_size, num_classes=0, schedule=settings.mask_schedule,
      exact=settings.exact_mask, loss_on=settings.loss_on, label_smoothing=settings.label_smoothing,
      ema_decay=settings.ema_decay), donate_argnums=0)
  state = mdm.init_train_state(model, tx, args.seed)
  rng = np.random.default_rng(args.seed + 1)
  labels = jnp.zeros((args.teacher_batch,), jnp.int32)  # the null class of an unconditional model
  t0 = time.time()
  for i in range(args.teacher_steps):
    state, m = step(state, jnp.asarray(joint.sample(rng, args.teacher_batch)), labels)
    if (i + 1) % 1000 == 0:
      print(f"  teacher step {i + 1}: loss {float(m['loss']):.4f} ({time.time() - t0:.0f}s)", flush=True)
  return state.ema_params


def teacher_tag(args) -> str:
  return (f"v{args.vocab}_l{args.seq_len}_c{args.chains}_j{args.joint_seed}_w{args.width}_d{args.depth}_"
         f"s{args.teacher_steps}_b{args.teacher_batch}_lr{args.teacher_lr}_{args.teacher_loss_on}_"
         f"ls{args.teacher_label_smoothing}_seed{args.seed}")


def load_or_train_teacher(args, joint, model):
  from flax import serialization  # pylint: disable=import-outside-toplevel
  path = os.path.join(args.out, f"teacher_{teacher_tag(args)}.msgpack")
  template = maskgit.init_params(model, jax.random.key(0))
  if os.path.exists(path):
    with open(path, "rb") as f:
      print(f"teacher: loaded {path}", flush=True)
      return serialization.from_bytes(template, f.read()), 0.0
  t0 = time.time()
  params = train_teacher(args, joint, model)
  seconds = time.time() - t0
  with open(path, "wb") as f:
    f.write(serialization.to_bytes(params))
  return params, seconds


def teacher_rows(args, joint, model, params, floor):
  apply_fn = conditioning.make_apply_fn(model)
  labels = lambda b: jnp.zeros((b,), jnp.int32)
  rows = []
  if args.teacher_rows == "none":
    return rows
  cache = os.path.join(args.out, f"teacher_rows_{teacher_tag(args)}_n{args.num_samples}_{args.teacher_rows}.json")
  if os.path.exists(cache):
    with open(cache) as f:
      print(f"teacher rows: loaded {cache}", flush=True)
      return json.load(f)
  step_list = [1, joint.seq_len] if args.teacher_rows == "ends" else list(range(1, joint.seq_len + 1))
  for name in ("confidence", "ancestral"):
    for steps in step_list:
      if name == "confidence":
        fn = lambda k, b, s=steps: samplers.confidence_sampler(
            apply_fn, params, k, labels(b), seq_len=joint.seq_len, codebook_size=joint.vocab_size,
            steps=s, r_temp=4.5)
      else:
        fn = lambda k, b, s=steps: samplers.ancestral_sampler(
            apply_fn, params, k, labels(b), seq_len=joint.seq_len, codebook_size=joint.vocab_size, steps=s)
      x = draw(fn, args.num_samples, 10000, jax.random.key(100 + steps))
      tv = joints.tv_distance(joint, x)
      rows.append({"model": f"teacher {name}", "steps": steps, "tv": tv, "tv_over_floor": tv / floor,
                   **joints.diversity(joint, x[: args.diversity_samples])})
      print(f"  teacher {name} {steps} steps: TV {tv:.4f}", flush=True)
  with open(cache, "w") as f:
    json.dump(rows, f, indent=1)
  return rows


# ------------------------------------------------------------------------------------- Di[M]O
def distill_variant(args, joint, model, teacher_params, variant, floor):
  opts = dict(DEFAULT_DISTILL, **{k: v for k, v in variant.items() if k != "name"})
  cfg = tokens_config.get_config()
  for k, v in opts.items():
    cfg.distill[k] = tuple(v) if k == "freeze" else v
  seed = args.seed if args.distill_seed is None else args.distill_seed
  if args.exact_teacher:
    dist = dimo.build_distiller(cfg, model, teacher_model=exact.exact_teacher(joint))
    state = dist.init_state({}, seed, student_params=teacher_params)
  else:
    dist = dimo.build_distiller(cfg, model)
    state = dist.init_state(teacher_params, seed)
  step, state = dist.jit_step(state)
  r_eval = float(str(opts["r_init"]).split("_")[-1])
  gen = jax.jit(lambda p, k, b, t: samplers.one_step_generate(
      model, p, k, jnp.zeros((b,), jnp.int32), r_init=r_eval, sigma=opts["sigma"], temperature=t),
                static_argnums=2)

  def score(params, n, seed=7, temperature=1.0):
    x = draw(lambda k, b: gen(params, k, b, temperature), n, 10000, jax.random.key(seed))
    return joints.tv_distance(joint, x), x

  curve = [{"step": 0, "tv_gen": score(state.gen.params, 10000)[0]}]
  t0 = time.time()
  for i in range(opts["steps"]):
    state, m = step(state)
    if (i + 1) % args.eval_every == 0 or i + 1 == opts["steps"]:
      m = jax.device_get(m)
      point = {"step": i + 1, "tv_gen": score(state.gen.params, 10000)[0],
               "tv_ema": score(state.ema_params, 10000)[0],
               "token_divergence": float(m["gen/token_divergence"]), "entropy": float(m["gen/entropy"]),
               "aux_loss": float(m["aux/loss"]), "seconds": time.time() - t0}
      curve.append(point)
      print(f"  [{variant.get('name')}] step {i + 1}: TV gen {point['tv_gen']:.4f} ema {point['tv_ema']:.4f} "
            f"tokdiv {point['token_divergence']:.3f} ent {point['entropy']:.3f} ({point['seconds']:.0f}s)",
            flush=True)
  rows = []
  for which, params in (("generator", state.gen.params), ("generator EMA", state.ema_params)):
    for temperature in args.eval_temperatures:
      tv, x = score(params, args.num_samples, seed=11, temperature=temperature)
      source = " from the exact teacher" if args.exact_teacher else ""
      temp = f" at temperature {temperature:g}" if temperature != 1.0 else ""
      rows.append({"model": f"Di[M]O {which}{source}{temp} [{variant.get('name')}]", "steps": 1, "tv": tv,
                   "tv_over_floor": tv / floor, **joints.diversity(joint, x[: args.diversity_samples])})
  return rows, {"name": variant.get("name"), "settings": opts, "curve": curve,
                "seconds": time.time() - t0}


def markdown(rows, floor, truth_div, n, div_n) -> str:
  lines = [f"Exact TV to the truth from {n} samples (floor: an i.i.d. truth sample of the same size).", "",
           f"| sampler | steps | TV | TV / floor | distinct ({div_n}) | entropy ({div_n}, nats) | top share |",
           "|---|---|---|---|---|---|---|",
           f"| truth sample (floor) | - | {floor:.4f} | 1.00 | {truth_div['distinct']} | "
           f"{truth_div['entropy']:.3f} | {truth_div['top_share']:.3f} |"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['steps']} | {r['tv']:.4f} | {r['tv_over_floor']:.2f} | {r['distinct']} | "
                 f"{r['entropy']:.3f} | {r['top_share']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  joint = joints.markov_mixture(args.vocab, args.seq_len, args.chains, seed=args.joint_seed)
  floor = joints.sampling_floor(joint, args.num_samples, seed=args.seed + 5)
  truth_div = joints.diversity(joint, joint.sample(np.random.default_rng(args.seed + 6), args.diversity_samples))
  print(f"truth: {len(joint.probs)} sequences, floor TV at n={args.num_samples}: {floor:.4f}", flush=True)
  model = maskgit.MaskTransformer(codebook_size=args.vocab, seq_len=args.seq_len, num_classes=0,
                                 width=args.width, depth=args.depth, heads=4, mlp_dim=4 * args.width)
  teacher_params, teacher_seconds = load_or_train_teacher(args, joint, model)
  rows = teacher_rows(args, joint, model, teacher_params, floor)
  runs = []
  for variant in args.variants:
    r, run = distill_variant(args, joint, model, teacher_params, variant, floor)
    rows += r
    runs.append(run)
  table = markdown(rows, floor, truth_div, args.num_samples, args.diversity_samples)
  print(table)
  result = {"args": {k: v for k, v in vars(args).items()}, "floor": floor, "truth_diversity": truth_div,
            "teacher_seconds": teacher_seconds, "rows": rows, "runs": runs}
  stem = "results" + ("_exact" if args.exact_teacher else "") + "".join(
      f"_{v.get('name', i)}" for i, v in enumerate(args.variants))
  with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
    f.write(table + "\n")
  return result


if __name__ == "__main__":
  main()
