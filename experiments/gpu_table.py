"""One accelerator session, one table: the measurements a GPU run of dimo_jax owes, in one go.

  python experiments/gpu_table.py --authors_repo=/path/to/DiMO --out=$OUT/gpu_table
  python experiments/gpu_table.py --size=tiny --out=/tmp/gpu_table_tiny      # a CPU dry run

Rows, each measured by the experiment script that owns it (random weights throughout):

1. ``configs/maskgit.py`` at full size (24 x 768, 257 tokens, bf16, ``remat=full``) at batch
   ``--batch`` (64): the Di[M]O step's median, lower + compile time, the device's peak bytes in use
   and MFU (``experiments/benchmark.py``); with it one-step sampling of ``--sample_batch`` (64)
   images, transformer alone and with the f16 Taming VQGAN decoder at 256 px.
2. The same step at the largest batch that fits: XLA's estimate of the compiled step is affine in
   the batch, so two compiles (``--batch`` and twice it) give the line; the largest multiple of 8
   under the device's limit (``--budget_gb``, else what JAX may use of the device) is then timed.
3. The authors' PyTorch step at the same settings (``experiments/compare_authors.py --size=full``,
   their model from ``--authors_repo``); left out, and said so, without a checkout.
4. The text-to-image step of ``configs/meissonic.py``'s recipe at batch ``--t2i_batch`` (16) at 1024 px
   (``experiments/meissonic_gpu.py``) with MFU from XLA's count of one unrolled forward.

``--size=tiny`` shrinks every model to a CPU-sized one and compiles at XLA optimisation level 0: it
checks that the script runs end to end, its numbers mean nothing. ``--parts`` picks rows
(``maskgit,max_batch,authors,t2i``). Writes ``<out>/gpu_table.json`` and ``.md``; prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import shlex
import sys
import time
import types
from typing import Any, Dict, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

PARTS = ("maskgit", "max_batch", "authors", "t2i")
SIZES = ("full", "tiny")
GB = 1e9


def _script(name: str):
  """``experiments/<name>.py`` as a module (the experiments are scripts, not a package)."""
  key = f"dimo_{name}_script"  # the name tests/conftest.py and compare_authors.py give it
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, os.path.join(_HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
  return sys.modules[key]


@dataclasses.dataclass
class Options:
  size: str = "full"
  parts: str = ",".join(PARTS)
  batch: int = 64
  sample_batch: int = 64
  t2i_batch: int = 16
  steps: int = 10
  warmup: int = 2
  budget_gb: float = 0.0  # 0: what JAX may use of the device
  peak_tflops: float = 0.0  # 0: benchmark.py's table by device kind
  authors_repo: str = ""
  out: str = ""
  command: str = ""

  def part_list(self) -> List[str]:
    return [p.strip() for p in self.parts.split(",") if p.strip()]

  def validate(self):
    if self.size not in SIZES:
      raise ValueError(f"--size={self.size!r}: choose one of {list(SIZES)}")
    bad = [p for p in self.part_list() if p not in PARTS]
    if bad or not self.part_list():
      raise ValueError(f"--parts={self.parts!r}: pass a comma-separated list of {list(PARTS)}"
                       + (f" (unknown: {bad})" if bad else ""))
    for name in ("batch", "sample_batch", "t2i_batch", "steps"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
    if self.warmup < 0:
      raise ValueError(f"--warmup={self.warmup} must be >= 0")
    for name in ("budget_gb", "peak_tflops"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--{name}={value} must be a finite number >= 0 (0: the device's own)")


def parse_args(argv: Sequence[str]) -> Options:
  """The command line as ``Options`` (ValueError naming the flag on a bad value)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  for field in dataclasses.fields(Options):
    if field.name == "command":
      continue
    p.add_argument("--" + field.name, type=type(field.default), default=field.default)
  args = p.parse_args(list(argv))
  opts = Options(**vars(args), command=" ".join(shlex.quote(a) for a in ["python", "experiments/gpu_table.py", *argv]))
  opts.validate()
  return opts


# ---------------------------------------------------------------------------- MaskGIT


def maskgit_config(size: str):
  from configs import maskgit  # pylint: disable=import-outside-toplevel
  c = maskgit.get_config("1")
  if size == "tiny":
    c.model.depth, c.model.width, c.model.heads, c.model.mlp_dim = 1, 32, 2, 64
    c.data.vocab_size, c.data.seq_len, c.data.num_classes, c.data.image_shape = 16, 16, 10, (4, 4)
    c.sample.steps = 2
  return c


def _bench_options(bm, opts: Options, batch: int, sampling: bool):
  return bm.BenchmarkOptions(
      steps=opts.steps, warmup=opts.warmup, batch=batch, sample_batch=opts.sample_batch, sample_reps=3,
      skip_sampling=not sampling, vqgan="small" if opts.size == "tiny" else "full",
      peak_tflops=opts.peak_tflops, count_unrolled=False, fast_compile=opts.size == "tiny")


def _step_row(name: str, record: Dict[str, Any]) -> Dict[str, Any]:
  s, mem, fl = record["step"], record["memory"], record["flops"]
  peak = mem["peak_device_bytes_after_step"]
  return {"row": name, "batch": s["batch"], "median_s": s["median_s"], "compile_s": s["lower_and_compile_s"],
          "peak_gb": None if peak is None else peak / GB,
          "xla_estimate_gb": (mem["compiled_step"] or {}).get("estimated_bytes", 0) / GB or None,
          "mfu": fl["mfu_analytic"], "tflop": fl["analytic_per_step"] / 1e12}


def maskgit_rows(opts: Options) -> List[Dict[str, Any]]:
  """The step at ``opts.batch`` and one-step sampling with and without the VQ decoder."""
  bm = _script("benchmark")
  record = bm.run_benchmark(maskgit_config(opts.size), _bench_options(bm, opts, opts.batch, True))
  rows = [_step_row("dimo_jax step (configs/maskgit.py)", record)]
  sampling = record["sampling"] or {}
  for key, label in (("generator", "one-step sampling, transformer"),
                     ("generator_vqgan", "one-step sampling + VQGAN decode")):
    if key in sampling:
      rows.append({"row": label, "batch": sampling["batch"], "median_s": sampling[key]["median_s"],
                   "compile_s": sampling.get(key.replace("_vqgan", ""), {}).get("compile_s")})
  return rows


def largest_batch(opts: Options) -> Dict[str, Any]:
  """Largest multiple of 8 whose step XLA expects within the limit: the line through the estimates
  at two batches, then the estimate at the batch it gives, refitted (at most three more compiles)
  until one fits."""
  sm = _script("step_memory")
  from dimo_jax.core import memory  # pylint: disable=import-outside-toplevel
  limit = opts.budget_gb * GB if opts.budget_gb else memory.device_bytes_limit()
  if not limit:
    raise ValueError("the device reports no memory limit (a CPU): pass --budget_gb=<GB> for the largest batch")
  config = maskgit_config(opts.size)
  options = _script("benchmark").FAST_COMPILE_OPTIONS if opts.size == "tiny" else None
  estimate = lambda b: sm.step_memory(config, batch=b, compiler_options=options)["estimated_bytes"]
  tried = {opts.batch: estimate(opts.batch), 2 * opts.batch: estimate(2 * opts.batch)}
  lo, hi = opts.batch, 2 * opts.batch
  for _ in range(4):
    per_row = max((tried[hi] - tried[lo]) / (hi - lo), 1.0)
    guess = int(hi + (limit - tried[hi]) / per_row)
    guess = max(8, guess - guess % 8)
    if guess in tried:
      break
    tried[guess] = estimate(guess)
    lo, hi = (hi, guess) if guess > hi else (guess, hi)
    if tried[guess] <= limit and guess >= max(b for b, e in tried.items() if e <= limit):
      break
  fitting = [b for b, e in tried.items() if e <= limit]
  best = max(fitting) if fitting else min(tried)
  return {"limit_bytes": limit, "estimates": tried, "batch": best, "fits": bool(fitting)}


def max_batch_rows(opts: Options) -> List[Dict[str, Any]]:
  found = largest_batch(opts)
  bm = _script("benchmark")
  record = bm.run_benchmark(maskgit_config(opts.size), _bench_options(bm, opts, found["batch"], False))
  return [{**_step_row("dimo_jax step, largest batch", record), "search": found}]


# ---------------------------------------------------------------------------- the authors, text-to-image


def authors_rows(opts: Options) -> List[Dict[str, Any]]:
  if not opts.authors_repo:
    return [{"row": "authors' step (PyTorch)", "note": "not run: pass --authors_repo=<checkout of yuanzhi-zhu/DiMO>"}]
  ca = _script("compare_authors")
  spec = ca.Spec(**{**ca.SIZES["full" if opts.size == "full" else "tiny"], "batch": opts.batch})
  record = ca.run(spec, ca.RunOptions(authors_repo=opts.authors_repo, steps=opts.steps, warmup=opts.warmup,
                                      sample_reps=1, sides="authors"))
  side = record["rounds"]["authors"][0]
  step, mem = side["step"], side.get("memory", {})
  peak = mem.get("device_peak_bytes") or mem.get("peak_rss_timed_steps_bytes")
  return [{"row": "authors' step (PyTorch)", "batch": spec.batch, "median_s": step["median_s"],
           "peak_gb": None if peak is None else peak / GB}]


def t2i_rows(opts: Options) -> List[Dict[str, Any]]:
  """``configs/meissonic.py``'s step at ``opts.t2i_batch``; MFU from XLA's count of one unrolled forward."""
  mg = _script("meissonic_gpu")
  bm = _script("benchmark")
  import jax  # pylint: disable=import-outside-toplevel
  from configs import meissonic as meissonic_config  # pylint: disable=import-outside-toplevel
  from dimo_jax.method import dimo  # pylint: disable=import-outside-toplevel
  tiny = opts.size == "tiny"
  args = types.SimpleNamespace(tiny=tiny, grid=64, batches=[opts.t2i_batch], steps=opts.steps, remat="full")
  step = mg.measure_steps(args)[-1]
  if "error" in step or "step_s" not in step:
    return [{"row": "text-to-image step (configs/meissonic.py)", "batch": opts.t2i_batch,
             "note": step.get("error", "no time")}]
  cfg = meissonic_config.get_config()
  mcfg = dataclasses.replace(mg.transformer_config(args, cfg.distill.compute_dtype, cfg.distill.param_dtype,
                                                   "none"), scan=False)
  text_len = 8 if tiny else mg.TEXT_LEN
  model = mg.meissonic.MeissonicTransformer(mcfg)
  tokens = jax.ShapeDtypeStruct((1, mcfg.seq_len), jax.numpy.int32)
  cond = jax.eval_shape(lambda: mg.random_conditions(jax.random.key(0), (1,), mcfg, text_len))
  params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jax.numpy.zeros((1, mcfg.seq_len),
                                                                                             jax.numpy.int32),
                                             mg.random_conditions(jax.random.key(0), (1,), mcfg, text_len)))
  forward = bm.cost_flops(jax.jit(lambda p, t, c: model.apply(p, t, c)).lower(params, tokens, cond).cost_analysis())
  settings = dimo.DistillSettings.from_config(cfg)
  flops = None if forward is None else forward * bm.forward_equivalents(settings) * opts.t2i_batch
  peak, _ = bm.peak_flops_per_device(bm.BenchmarkOptions(peak_tflops=opts.peak_tflops))
  mfu = None if (flops is None or peak is None) else flops / step["step_s"] / peak
  return [{"row": "text-to-image step (configs/meissonic.py)", "batch": opts.t2i_batch, "median_s": step["step_s"],
           "compile_s": step.get("lower_s", 0) + step.get("compile_s", 0), "peak_gb": step.get("peak_gb"),
           "xla_estimate_gb": step.get("xla_estimate_gb"), "mfu": mfu,
           "tflop": None if flops is None else flops / 1e12}]


# ---------------------------------------------------------------------------- the table


def markdown(record: Dict[str, Any]) -> str:
  def num(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"

  lines = [f"`{record['command']}`", "", f"{record['device']}, jax {record['jax_version']}, {record['date']}, "
           f"size {record['size']}.", "",
           "| measurement | batch | median (s) | lower + compile (s) | peak (GB) | XLA estimate (GB) | "
           "TFLOP / step | MFU | note |", "|---|---|---|---|---|---|---|---|---|"]
  for r in record["rows"]:
    mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
    lines.append(f"| {r['row']} | {r.get('batch', '-')} | {num(r.get('median_s'))} | {num(r.get('compile_s'), 3)} | "
                 f"{num(r.get('peak_gb'), 3)} | {num(r.get('xla_estimate_gb'), 3)} | {num(r.get('tflop'), 3)} | "
                 f"{mfu} | {r.get('note', '')} |")
  return "\n".join(lines) + "\n"


RUNNERS = {"maskgit": maskgit_rows, "max_batch": max_batch_rows, "authors": authors_rows, "t2i": t2i_rows}


def run(opts: Options) -> Dict[str, Any]:
  """Every part of ``opts.parts`` in turn; a part that fails leaves a row with its error."""
  opts.validate()
  import jax  # pylint: disable=import-outside-toplevel
  d0 = jax.devices()[0]
  record = {"command": opts.command or "gpu_table.run(opts)", "date": datetime.date.today().isoformat(),
            "device": f"{d0.platform}: {d0.device_kind}", "jax_version": jax.__version__, "size": opts.size,
            "options": dataclasses.asdict(opts), "rows": []}
  for part in opts.part_list():
    t0 = time.perf_counter()
    try:
      rows = RUNNERS[part](opts)
    except Exception as e:  # pylint: disable=broad-except
      rows = [{"row": part, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}]
    for r in rows:
      r["part_s"] = time.perf_counter() - t0
    record["rows"].extend(rows)
    print(json.dumps(rows, default=str), flush=True)
    if opts.out:
      _write(opts.out, record)
  print(markdown(record))
  return record


def _write(out: str, record: Dict[str, Any]):
  os.makedirs(out, exist_ok=True)
  for name, text in (("gpu_table.json", json.dumps(record, indent=1, default=str)), ("gpu_table.md", markdown(record))):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


def main(argv: Optional[Sequence[str]] = None):
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    opts = parse_args(argv)
  except ValueError as err:
    print(f"gpu_table.py: {err}", file=sys.stderr)
    sys.exit(2)
  run(opts)


if __name__ == "__main__":
  main()
