"""Exact-count masks: one sort of distinct random scores (``masking.exact_count_mask``) against
ranking uniform noise by a double argsort (``masking.random_ranks(...) < count``).

  python experiments/mask_benchmark.py --shapes=64x256,256x1024 --repeats=5

Each row: the median over ``--repeats`` of the mean time of ``--calls`` jit-compiled calls,
each synchronised, on the default device. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dimo_jax.core import masking


def double_argsort_mask(key, shape, count):
  return masking.random_ranks(key, shape) < jnp.asarray(count, jnp.int32).reshape(-1, 1)


METHODS = {"double argsort": double_argsort_mask, "one sort": masking.exact_count_mask}


def parse_shapes(text: str):
  shapes = []
  for item in text.split(","):
    try:
      b, l = (int(v) for v in item.lower().split("x"))
    except ValueError:
      raise ValueError(f"--shapes item {item!r} is not BATCHxLENGTH (e.g. 64x256)") from None
    if b < 1 or l < 1:
      raise ValueError(f"--shapes item {item!r}: batch and length must be >= 1")
    shapes.append((b, l))
  return shapes


def time_ms(fn, calls: int, repeats: int) -> float:
  jax.block_until_ready(fn(jax.random.key(0)))
  means = []
  for r in range(repeats):
    t0 = time.perf_counter()
    for i in range(calls):
      jax.block_until_ready(fn(jax.random.key(r * calls + i)))
    means.append((time.perf_counter() - t0) / calls)
  return statistics.median(means) * 1e3


def run(shapes, ratio: float, calls: int, repeats: int):
  rows = []
  for b, l in shapes:
    count = jnp.full((b,), max(1, round(l * ratio)), jnp.int32)
    row = {"batch": b, "length": l}
    for name, fn in METHODS.items():
      compiled = jax.jit(lambda k, fn=fn: fn(k, (b, l), count))
      assert int(compiled(jax.random.key(1)).sum()) == b * int(count[0])
      row[name] = time_ms(compiled, calls, repeats)
    rows.append(row)
  return rows


def markdown(rows) -> str:
  lines = [f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", "",
           "| batch x length | " + " | ".join(f"{m} (ms)" for m in METHODS) + " | speed-up |",
           "|---|" + "---|" * (len(METHODS) + 1)]
  for r in rows:
    times = [r[m] for m in METHODS]
    lines.append(f"| {r['batch']} x {r['length']} | " + " | ".join(f"{t:.3f}" for t in times)
                 + f" | {times[0] / times[-1]:.1f}x |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="64x256,256x1024", help="comma-separated BATCHxLENGTH")
  p.add_argument("--ratio", type=float, default=0.6, help="fraction of each row masked")
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  rows = run(parse_shapes(args.shapes), args.ratio, args.calls, args.repeats)
  print(markdown(rows))
  return rows


if __name__ == "__main__":
  main()
