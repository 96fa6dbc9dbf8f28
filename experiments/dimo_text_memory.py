"""XLA's memory analysis of the full-size text-to-image Di[M]O step (Meissonic teacher, generator
and auxiliary with Adam, ``configs/meissonic.py``'s distillation recipe), compiled for the shapes
of the state: nothing is allocated, so it runs on a CPU.

  python experiments/dimo_text_memory.py --batch=16 --remat=full [--grid=64] [--fsdp=1] \
      [--attention=xla_saved] [--layers=14 --single_layers=28]

``--layers`` / ``--single_layers`` compile fewer blocks of the same width (the levers' per-block
effect at a fraction of the compile time); ``--attention`` is ``meissonic.attention_impl``.

Prints one JSON line: parameters, the state's bytes, XLA's argument / output / temporary bytes and
the per-device estimate that ``mode=distill`` compares against the device before the first update.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import meissonic as meissonic_config  # noqa: E402
from dimo_jax.core import sharding  # noqa: E402
from dimo_jax.core.memory import estimated_bytes  # noqa: E402
from dimo_jax.method import dimo  # noqa: E402
from dimo_jax.networks import meissonic, text_conditioning  # noqa: E402


def analyse(batch: int, remat: str, grid: int = 64, fsdp: int = 1, aux_updates: int = 1, attention: str = "",
            layers: int = 0, single_layers: int = 0) -> dict:
  cfg = meissonic_config.get_config()
  cfg.distill.batch_size = batch
  cfg.distill.aux_updates = aux_updates
  d = cfg.distill
  depth = {k: v for k, v in (("num_layers", layers), ("num_single_layers", single_layers)) if v}
  mcfg = meissonic.MeissonicConfig(dtype=d.compute_dtype, param_dtype=d.param_dtype, remat=remat, grid=grid,
                                   attention_impl=attention or None, **depth)
  model = text_conditioning.TextTokenModel(meissonic.MeissonicTransformer(mcfg), text_len=77)
  spec = {"text": jax.ShapeDtypeStruct((77, mcfg.text_dim), jnp.float32),
          "pooled": jax.ShapeDtypeStruct((mcfg.pooled_dim,), jnp.float32),
          "micro": jax.ShapeDtypeStruct((5,), jnp.float32)}
  dist = dimo.build_distiller(cfg, model, cond_spec=spec)
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
  shapes = jax.eval_shape(lambda p: dist.init_state(p, 0), params)
  mesh = sharding.make_mesh(devices=jax.devices()[:fsdp], fsdp=fsdp)
  t0 = time.time()
  fn, _ = dist._jit(shapes, mesh)  # pylint: disable=protected-access
  compiled = fn.lower(shapes, dist.abstract_conditions()).compile()
  a = compiled.memory_analysis()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
  return {"batch": batch, "remat": remat, "grid": grid, "fsdp": fsdp, "attention": attention or "xla",
          "layers": mcfg.num_layers, "single_layers": mcfg.num_single_layers,
          "params": meissonic.count_params(params), "state_gb": state_bytes / 1e9,
          "argument_gb": a.argument_size_in_bytes / 1e9, "output_gb": a.output_size_in_bytes / 1e9,
          "alias_gb": a.alias_size_in_bytes / 1e9, "temp_gb": a.temp_size_in_bytes / 1e9,
          "estimate_gb": estimated_bytes(a) / 1e9, "compile_s": time.time() - t0}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--remat", default="full")
  p.add_argument("--grid", type=int, default=64)
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--attention", default="", help="'' (XLA, fused backward) | xla_saved | cudnn")
  p.add_argument("--layers", type=int, default=0, help="double-stream blocks (0: the released 14)")
  p.add_argument("--single_layers", type=int, default=0, help="single-stream blocks (0: the released 28)")
  args = p.parse_args(argv)
  print(json.dumps(analyse(args.batch, args.remat, args.grid, args.fsdp, attention=args.attention,
                           layers=args.layers, single_layers=args.single_layers)), flush=True)


if __name__ == "__main__":
  main()
