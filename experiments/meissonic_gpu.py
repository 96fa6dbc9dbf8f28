"""Text-to-image Di[M]O on one accelerator: the full-size distillation step and one-step sampling
against Meissonic's 48-step sampler, at 1024 px, with random weights (speed and memory do not
depend on the weights' values).

1. The step of ``configs/meissonic.py``'s recipe (teacher, generator and auxiliary with Adam,
   bf16 compute over float32 master weights, guidance against the negative prompt in the same
   call, ``--remat``) at each per-device batch of ``--batches``, in ascending order on one device:
   lower + compile time (ahead of time), the median of ``--steps`` timed steps after one untimed
   step, and the device's peak bytes in use after that batch (the allocator's peak only grows, so
   with ascending batches it is the peak of the batch just run). XLA's own estimate of the step
   is printed beside it.
2. Sampling at ``--sample_batch`` images: the one-step generator (``one_step_cond_sampler``) against
   the teacher's guided 48-step sampler (``gumbel_ramp_sampler``), both with bf16 parameters, each
   compiled first, then the median of ``--repeats`` runs; token ids only (the VQ decoder is the
   same for both and is timed on its own row).

  python experiments/meissonic_gpu.py --out=/tmp/meissonic_gpu
  python experiments/meissonic_gpu.py --tiny --batches=1,2 --steps=2   # a CPU check of the script

Prints one JSON line per measurement and a markdown table at the end (also ``<out>/*.json|md``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position

from configs import meissonic as meissonic_config  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.core import samplers as ms  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.core import sharding  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.core.memory import estimated_bytes  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.method import dimo  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.networks import conditioning, meissonic, meissonic_vq, text_conditioning  # noqa: E402  pylint: disable=wrong-import-position

GB = 1e9
TEXT_LEN = 77


def _peak_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def transformer_config(args, dtype: str, param_dtype: str, remat: str) -> meissonic.MeissonicConfig:
  if args.tiny:
    return meissonic.MeissonicConfig.tiny(dtype=dtype, param_dtype=param_dtype, remat=remat)
  return meissonic.MeissonicConfig(dtype=dtype, param_dtype=param_dtype, remat=remat, grid=args.grid)


def random_conditions(key, lead, mcfg: meissonic.MeissonicConfig, text_len: int):
  k1, k2 = jax.random.split(key)
  micro = jnp.broadcast_to(jnp.asarray(meissonic_config.get_config().sample.micro_conds, jnp.float32),
                           (*lead, 5))
  return {"text": jax.random.normal(k1, (*lead, text_len, mcfg.text_dim), jnp.float32),
          "pooled": jax.random.normal(k2, (*lead, mcfg.pooled_dim), jnp.float32), "micro": micro}


def measure_steps(args) -> List[Dict[str, Any]]:
  """Part 1: the distillation step at each batch (see the module docstring)."""
  cfg = meissonic_config.get_config()
  d = cfg.distill
  mcfg = transformer_config(args, d.compute_dtype, d.param_dtype, args.remat)
  text_len = 8 if args.tiny else TEXT_LEN
  model = text_conditioning.TextTokenModel(meissonic.MeissonicTransformer(mcfg), text_len=text_len)
  spec = {"text": jax.ShapeDtypeStruct((text_len, mcfg.text_dim), jnp.float32),
          "pooled": jax.ShapeDtypeStruct((mcfg.pooled_dim,), jnp.float32),
          "micro": jax.ShapeDtypeStruct((5,), jnp.float32)}
  t0 = time.perf_counter()
  params = jax.jit(model.init_params)(jax.random.key(0))
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.dtype(d.param_dtype)), params)
  jax.block_until_ready(params)
  print(json.dumps({"init_s": time.perf_counter() - t0, "params": meissonic.count_params(params)}), flush=True)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rows, state = [], None
  for batch in args.batches:
    cfg.distill.batch_size = batch
    dist = dimo.build_distiller(cfg, model, cond_spec=spec)
    if state is None:
      state = jax.jit(lambda p: dist.init_state(p, 0))(params)
      del params
    row: Dict[str, Any] = {"part": "step", "batch": batch, "remat": args.remat,
                           "aux_updates": int(d.aux_updates)}
    fn, shardings = dist._jit(state, mesh)  # pylint: disable=protected-access
    state = jax.device_put(state, shardings)
    conds = dist.place_conditions({
        "gen": random_conditions(jax.random.key(1), (batch,), mcfg, text_len),
        "aux": random_conditions(jax.random.key(2), (int(d.aux_updates), batch), mcfg, text_len),
        "neg": random_conditions(jax.random.key(3), (1,), mcfg, text_len)})
    t0 = time.perf_counter()
    lowered = fn.lower(state, conds)
    t1 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(row), flush=True)
      rows.append(row)
      break
    row.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
    analysis = compiled.memory_analysis()
    if analysis is not None:
      row["xla_estimate_gb"] = estimated_bytes(analysis) / GB
      row["xla_temp_gb"] = analysis.temp_size_in_bytes / GB
    try:
      state, metrics = compiled(state, conds)
      jax.block_until_ready(state)
      times = []
      for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, conds)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(row), flush=True)
      rows.append(row)
      break
    row.update(step_s=statistics.median(times), step_min_s=min(times), peak_gb=_peak_bytes() / GB,
               finite=bool(all(jnp.isfinite(jnp.asarray(v)).all() for v in metrics.values())),
               images_per_s=batch / statistics.median(times))
    print(json.dumps(row), flush=True)
    rows.append(row)
  del state
  return rows


def measure_sampling(args) -> List[Dict[str, Any]]:
  """Part 2: one-step generator against the 48-step guided sampler, and the VQ decoder."""
  mcfg = transformer_config(args, "bfloat16", "bfloat16", "none")
  text_len = 8 if args.tiny else TEXT_LEN
  net = meissonic.MeissonicTransformer(mcfg)
  params = jax.jit(lambda k: meissonic.init_params(mcfg, k, text_len=text_len))(jax.random.key(0))
  apply_fn = conditioning.make_apply_fn(net, conditions=True)
  n = args.sample_batch
  cond = random_conditions(jax.random.key(4), (n,), mcfg, text_len)
  neg = random_conditions(jax.random.key(5), (1,), mcfg, text_len)
  rows = []
  programs = {
      "generator, 1 step": lambda: ms.one_step_cond_sampler(
          apply_fn, params, jax.random.key(6), cond, seq_len=mcfg.seq_len, mask_id=mcfg.mask_id,
          codebook_size=mcfg.codebook_size, r_init=0.5, noise_sigma=0.3),
      f"teacher, {args.teacher_steps} steps, guidance 9": lambda: ms.gumbel_ramp_sampler(
          apply_fn, params, jax.random.key(7), cond, neg, seq_len=mcfg.seq_len, mask_id=mcfg.mask_id,
          codebook_size=mcfg.codebook_size, steps=args.teacher_steps, guidance=9.0)}
  for name, fn in programs.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    row = {"part": "sampling", "program": name, "images": n, "first_call_s": first,
           "median_s": _median_time(fn, args.repeats)}
    print(json.dumps(row), flush=True)
    rows.append(row)
  gen, teacher = rows[0]["median_s"], rows[1]["median_s"]
  rows[0]["speedup_vs_teacher"] = teacher / gen
  if not args.tiny:
    vcfg = meissonic_vq.MeissonicVQConfig()
    vmodel = meissonic_vq.MeissonicVQModel(vcfg)
    vparams = jax.jit(lambda k: vmodel.init({"params": k}, jnp.zeros((1, 64, 64), jnp.int32),
                                            method="decode_ids")["params"])(jax.random.key(8))
    decode = jax.jit(lambda p, ids: vmodel.apply({"params": p}, ids, method="decode_ids"))
    ids = jnp.zeros((1, 64, 64), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(decode(vparams, ids))
    first = time.perf_counter() - t0
    row = {"part": "sampling", "program": "VQ decode (float32), 1 image", "images": 1, "first_call_s": first,
           "median_s": _median_time(lambda: decode(vparams, ids), args.repeats)}
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def markdown(record: Dict[str, Any]) -> str:
  lines = [f"`{record['command']}`", "", f"{record['device']}, jax {record['jax']}, {record['date']}.", "",
           "| per-device batch | remat | lower + compile (s) | step (s, median) | images/s | peak (GB) | XLA estimate (GB) |",
           "|---|---|---|---|---|---|---|"]
  for r in record["steps"]:
    if "error" in r:
      lines.append(f"| {r['batch']} | {r['remat']} | - | {r['error'][:80]} | - | - | - |")
      continue
    lines.append(f"| {r['batch']} | {r['remat']} | {r['lower_s']:.1f} + {r['compile_s']:.1f} | {r['step_s']:.3f} | "
                 f"{r['images_per_s']:.2f} | {r['peak_gb']:.1f} | {r.get('xla_estimate_gb', float('nan')):.1f} |")
  lines += ["", "| sampling | images | first call incl. compile (s) | median (s) |", "|---|---|---|---|"]
  for r in record["sampling"]:
    lines.append(f"| {r['program']} | {r['images']} | {r['first_call_s']:.1f} | {r['median_s']:.4f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  p.add_argument("--batches", default="1,2,4", help="per-device batches of the step, ascending")
  p.add_argument("--remat", default="full")
  p.add_argument("--steps", type=int, default=5, help="timed steps per batch (after one untimed)")
  p.add_argument("--sample_batch", type=int, default=1)
  p.add_argument("--teacher_steps", type=int, default=48)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--grid", type=int, default=64, help="token grid (64: 1024 px)")
  p.add_argument("--tiny", action="store_true", help="MeissonicConfig.tiny(): a check of the script on a CPU")
  p.add_argument("--skip", default="", help="'step' or 'sampling' to leave that part out")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  args.batches = sorted(int(b) for b in args.batches.split(","))
  d0 = jax.devices()[0]
  record = {"command": "python experiments/meissonic_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": f"{d0.platform} ({d0.device_kind})", "jax": jax.__version__,
            "date": datetime.date.today().isoformat(), "steps": [], "sampling": []}
  print(json.dumps({k: record[k] for k in ("device", "jax", "date")}), flush=True)
  if args.skip != "step":
    record["steps"] = measure_steps(args)
  if args.skip != "sampling":
    record["sampling"] = measure_sampling(args)
  table = markdown(record)
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "meissonic_gpu.json"), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "meissonic_gpu.md"), "w", encoding="utf-8") as f:
      f.write(table)


if __name__ == "__main__":
  main()
