"""XLA's memory analysis of Meissonic at 1024 px: the transformer forward, the 48-step sampler,
the VQ decoder and the CLIP text tower, with nothing allocated.

Every input and every parameter is abstract (``jax.ShapeDtypeStruct`` leaves from
``jax.eval_shape``); each program is lowered and compiled for the local backend and
``compiled.memory_analysis()`` gives the bytes of its arguments (the parameters and inputs), its
outputs and its temporaries. ``estimated`` is arguments + outputs - aliased + temporaries, the
figure ``dimo_jax.core.memory`` checks against a device. The transformer runs with guidance, so
the network batch is twice the image batch ([negative prompt; prompt]); its compute dtype is
``--dtype`` (bf16 by default) and its parameters are stored in ``--param_dtype``; the VQ decoder
runs in float32, one image at a time, as ``mode=sample`` does. Compile on the backend you will
sample on: temporaries differ between backends. ``--lower_only`` skips the compile and reports
XLA's cost analysis of the lowered program (FLOPs and bytes accessed) instead; with
``--unrolled`` (the blocks without ``nn.scan``) that count covers all 42 blocks, where the scanned
program's count covers each scan body once.

  python experiments/meissonic_memory.py --batches=1,4 --out=/tmp/meissonic_memory
  python experiments/meissonic_memory.py --programs=forward --batches=1,4 --lower_only --unrolled

Writes ``<out>/meissonic_memory.json`` and ``.md`` when ``--out`` is given; prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position

from dimo_jax.core import samplers as ms  # noqa: E402
from dimo_jax.core.memory import estimated_bytes  # noqa: E402
from dimo_jax.networks import clip_text, conditioning, meissonic, meissonic_vq  # noqa: E402

GB = 1e9
PROGRAMS = ("forward", "sampler", "vq", "clip")
TEXT_LEN = 77


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _tree_bytes(tree) -> int:
  return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)))


def transformer_config(dtype: str = "bfloat16", param_dtype: str = "bfloat16",
                       remat: str = "none", scan: bool = True) -> meissonic.MeissonicConfig:
  """The released transformer with the given compute / storage dtypes."""
  return meissonic.MeissonicConfig(dtype=dtype, param_dtype=param_dtype, remat=remat, scan=scan)


def abstract_transformer_params(config: meissonic.MeissonicConfig):
  """The transformer's parameters as ``ShapeDtypeStruct`` leaves in ``config.param_dtype``."""
  model = meissonic.MeissonicTransformer(config)
  tokens, cond = meissonic.dummy_inputs(config, batch=1, text_len=1)
  return jax.eval_shape(lambda k: model.init({"params": k}, tokens, cond)["params"],
                        jax.random.PRNGKey(0))


def _cond_structs(config: meissonic.MeissonicConfig, batch: int) -> Dict[str, jax.ShapeDtypeStruct]:
  return {"text": _struct((batch, TEXT_LEN, config.text_dim), jnp.float32),
          "pooled": _struct((batch, config.pooled_dim), jnp.float32),
          "micro": _struct((batch, 5), jnp.float32)}


def lower_forward(config: meissonic.MeissonicConfig, params, images: int):
  """One guided forward: the network at batch ``2 * images`` ([negative; prompt])."""
  model = meissonic.MeissonicTransformer(config)
  batch = 2 * images

  def forward(p, tokens, cond, timestep):
    return model.apply({"params": p}, tokens, cond, timestep=timestep)

  return jax.jit(forward).lower(params, _struct((batch, config.seq_len), jnp.int32),
                                _cond_structs(config, batch), _struct((), jnp.float32))


def lower_sampler(config: meissonic.MeissonicConfig, params, images: int, steps: int = 48):
  """Meissonic's whole ``steps``-step sampler with guidance against one negative prompt."""
  apply_fn = conditioning.make_apply_fn(meissonic.MeissonicTransformer(config), conditions=True)
  return ms.gumbel_ramp_sampler.lower(
      apply_fn, params, _struct((2,), jnp.uint32), _cond_structs(config, images),
      _cond_structs(config, 1), seq_len=config.seq_len, mask_id=config.mask_id,
      codebook_size=config.codebook_size, steps=steps, guidance=9.0)


def lower_vq(images: int = 1, grid: int = 64):
  """The VQ decoder in float32: ids ``[images, 64, 64]`` -> pixels ``[images, 1024, 1024, 3]``."""
  config = meissonic_vq.MeissonicVQConfig()
  params = meissonic_vq.abstract_params(config)
  model = meissonic_vq.MeissonicVQModel(config)
  decode = lambda p, ids: model.apply({"params": p}, ids, method="decode_ids")
  return jax.jit(decode).lower(params, _struct((images, grid, grid), jnp.int32)), params


def lower_clip(prompts: int, dtype: str = "float32"):
  """The CLIP-ViT-H text tower on ``prompts`` tokenised prompts."""
  config = clip_text.CLIPTextConfig()
  params = clip_text.abstract_params(config)
  model = clip_text.CLIPTextModel(config, dtype=jnp.dtype(dtype))
  encode = lambda p, ids: {k: v for k, v in model.apply({"params": p}, ids).items()
                           if k in ("penultimate", "pooled")}
  return jax.jit(encode).lower(params, _struct((prompts, TEXT_LEN), jnp.int32)), params


def _costs(obj) -> Dict[str, float]:
  try:
    cost = obj.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}


def measure(name: str, lowered, params_bytes: int, lower_s: float, lower_only: bool,
            **fields) -> Dict[str, Any]:
  """Memory analysis (or, with ``lower_only``, cost analysis) of one lowered program."""
  row: Dict[str, Any] = {"program": name, "params_bytes": params_bytes, "lower_s": lower_s, **fields}
  if lower_only:
    row.update({f"lowered_{k.replace(' ', '_')}": v for k, v in _costs(lowered).items()})
    return row
  t0 = time.perf_counter()
  compiled = lowered.compile()
  row["compile_s"] = time.perf_counter() - t0
  analysis = compiled.memory_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if analysis is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gave no memory analysis")
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "peak_memory_in_bytes"):
    if hasattr(analysis, key):
      row[key] = int(getattr(analysis, key))
  row["estimated_bytes"] = estimated_bytes(analysis)
  row.update({f"compiled_{k.replace(' ', '_')}": v for k, v in _costs(compiled).items()})
  return row


def device_info() -> Dict[str, str]:
  d0 = jax.devices()[0]
  kind = str(d0.device_kind)
  if d0.platform == "cpu":
    kind = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
  return {"backend": jax.default_backend(), "device_kind": kind, "jax_version": jax.__version__}


def run(programs: Sequence[str], batches: Sequence[int], dtype: str = "bfloat16",
        param_dtype: str = "bfloat16", steps: int = 48, lower_only: bool = False,
        remat: str = "none", scan: bool = True) -> List[Dict[str, Any]]:
  rows = []
  config = transformer_config(dtype, param_dtype, remat, scan)
  params = abstract_transformer_params(config) if {"forward", "sampler"} & set(programs) else None
  for program in programs:
    for images in (batches if program != "vq" else (1,)):
      t0 = time.perf_counter()
      if program == "forward":
        lowered, p = lower_forward(config, params, images), params
        extra = dict(images=images, network_batch=2 * images, dtype=dtype, param_dtype=param_dtype)
      elif program == "sampler":
        lowered, p = lower_sampler(config, params, images, steps), params
        extra = dict(images=images, network_batch=2 * images, steps=steps, dtype=dtype,
                     param_dtype=param_dtype)
      elif program == "vq":
        (lowered, p), extra = lower_vq(images), dict(images=images, dtype="float32",
                                                     param_dtype="float32")
      elif program == "clip":
        (lowered, p), extra = lower_clip(images + 1), dict(images=images, prompts=images + 1,
                                                           dtype="float32", param_dtype="float32")
      else:
        raise ValueError(f"unknown program {program!r}; choose from {PROGRAMS}")
      row = measure(program, lowered, _tree_bytes(p), time.perf_counter() - t0, lower_only, **extra)
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def markdown(record: Dict[str, Any]) -> str:
  lines = [f"`{record['command']}`", "",
           f"Backend {record['backend']} ({record['device_kind']}), jax {record['jax_version']}, "
           f"{record['date']}.", ""]
  if record["lower_only"]:
    lines += ["| program | images | network batch | params (GB) | lowered FLOPs (T) | bytes accessed (GB) | lower (s) |",
              "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
      lines.append(f"| {r['program']} | {r['images']} | {r.get('network_batch', r['images'])} | "
                   f"{r['params_bytes'] / GB:.3f} | {r.get('lowered_flops', float('nan')) / 1e12:.2f} | "
                   f"{r.get('lowered_bytes_accessed', float('nan')) / GB:.2f} | {r['lower_s']:.0f} |")
    return "\n".join(lines) + "\n"
  lines += ["| program | images | network batch | compute / params | params (GB) | arguments (GB) | "
            "outputs (GB) | temporaries (GB) | estimated total (GB) | XLA FLOPs (T) | lower + compile (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in record["rows"]:
    flops = r.get("compiled_flops")
    lines.append(
        f"| {r['program']} | {r['images']} | {r.get('network_batch', r.get('prompts', r['images']))} | "
        f"{r['dtype']} / {r['param_dtype']} | {r['params_bytes'] / GB:.3f} | "
        f"{r['argument_size_in_bytes'] / GB:.3f} | {r['output_size_in_bytes'] / GB:.3f} | "
        f"{r['temp_size_in_bytes'] / GB:.3f} | {r['estimated_bytes'] / GB:.3f} | "
        f"{'-' if flops is None else f'{flops / 1e12:.2f}'} | {r['lower_s'] + r['compile_s']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--programs", default="forward,vq,clip",
                      help=f"comma list of {', '.join(PROGRAMS)}")
  parser.add_argument("--batches", default="1,4", help="image batches (the VQ decoder always 1)")
  parser.add_argument("--dtype", default="bfloat16", help="transformer compute dtype")
  parser.add_argument("--param_dtype", default="bfloat16", help="transformer parameter dtype")
  parser.add_argument("--remat", default="none", help="transformer remat policy")
  parser.add_argument("--steps", type=int, default=48, help="sampler steps")
  parser.add_argument("--unrolled", action="store_true",
                      help="unroll the transformer's blocks (no nn.scan): XLA's FLOP count then "
                           "covers every block, where a scanned program counts each body once")
  parser.add_argument("--lower_only", action="store_true",
                      help="skip compiling; report the lowered program's cost analysis")
  parser.add_argument("--out", default="", help="folder for meissonic_memory.json / .md")
  args = parser.parse_args(argv)
  programs = [p.strip() for p in args.programs.split(",") if p.strip()]
  bad = [p for p in programs if p not in PROGRAMS]
  if bad or not programs:
    raise SystemExit(f"--programs={args.programs!r}: choose from {PROGRAMS}")
  batches = [int(b) for b in args.batches.split(",") if b.strip()]
  rows = run(programs, batches, args.dtype, args.param_dtype, args.steps, args.lower_only,
             args.remat, scan=not args.unrolled)
  record = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.date.today().isoformat(), "lower_only": args.lower_only,
            **device_info(), "rows": rows}
  table = markdown(record)
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "meissonic_memory.json"), "w") as f:
      json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "meissonic_memory.md"), "w") as f:
      f.write(table)
  return record


if __name__ == "__main__":
  main()
