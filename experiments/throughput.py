"""Images per second end to end: the sampler and the VQGAN decoder compiled together in one jit.

  # a GPU: the paper's sizes (MaskGIT 24 x 768 bf16, the f16 Taming VQGAN at 256 px)
  python experiments/throughput.py --size=full --out=$OUT/throughput
  # a CPU: a reduced pair (see SIZES) and a memory budget for "the largest batch that fits"
  python experiments/throughput.py --size=reduced --budget_gb=2 --out=/tmp/throughput

Rows: the one-step generator (x_init with 60 % masks, embedding noise, one forward, one draw) and
the teacher's MaskGIT confidence sampler at 8 and 16 steps with guidance (``configs/maskgit.py``'s
sampling settings: guidance 2.5 ramped linearly, temperature 1.3, r_temp 4.5), each followed by the
Taming VQGAN decoder inside the same compiled function, so the numbers are pixels per second as
a user gets them. Random weights (the speed does not depend on them); the generator has the
teacher's architecture.

Each row is timed at ``--batch`` (64) and at the largest batch that fits: the largest whose XLA
estimate of the compiled program (arguments + outputs - aliased + temporaries, from
``compiled.memory_analysis()``; nothing allocated) is within the budget: ``--budget_gb``, or on a
GPU / TPU ``--budget_fraction`` of what JAX may use of the device. The estimate is linear in the
batch; two compiles give the line, one more checks the batch read off it (a few more when it
misses); a run that still fails for memory retries at a smaller batch. ``--max_batch`` caps it.

The CPU size (``--size=reduced``) keeps the full pair's proportion of transformer to VQGAN FLOPs:
a 2 x 128 transformer (0.44 GFLOP per forward over 257 tokens, full size 94) and the f16 Taming
decoder at 256 px with 8 base channels and 8 groups (1.16 GFLOP per image, full size 250).

Writes ``<out>/throughput.json`` and ``<out>/throughput.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = {
    "full": dict(depth=24, width=768, heads=16, mlp_dim=3072, side=16, codebook=1024, classes=1000,
                 dtype="bfloat16", vqgan="full"),
    "reduced": dict(depth=2, width=128, heads=4, mlp_dim=512, side=16, codebook=1024, classes=1000,
                    dtype="float32", vqgan="reduced"),
    "tiny": dict(depth=1, width=32, heads=2, mlp_dim=64, side=4, codebook=16, classes=10,
                 dtype="float32", vqgan="small"),
}
VQGAN_CHOICES = ("full", "reduced", "small")
CPU_DEFAULT_BUDGET_GB = 2.0


def _load(name: str, file: str):
  """An experiment script as a module, under the name ``tests/conftest.py::load_script`` gives it."""
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def compare_authors():
  """``experiments/compare_authors.py``: its config builder and the project functions it reaches
  through ``benchmark.py`` (``project_api``)."""
  return _load("dimo_compare_authors_script", "compare_authors.py")


@dataclasses.dataclass
class Options:
  size: str = "reduced"
  depth: int = 0  # 0: the size's
  width: int = 0
  heads: int = 0
  mlp_dim: int = 0
  side: int = 0
  codebook: int = 0
  classes: int = 0
  dtype: str = ""
  vqgan: str = ""
  batch: int = 64
  teacher_steps: str = "8,16"
  guidance: float = 2.5
  largest: bool = True
  budget_gb: float = 0.0  # 0: budget_fraction of the device's limit; CPU_DEFAULT_BUDGET_GB on the CPU
  budget_fraction: float = 0.9
  max_batch: int = 4096
  batch_multiple: int = 8
  reps: int = 3
  warmup: int = 1
  seed: int = 0
  fast_compile: bool = False  # smoke runs: XLA backend optimisation level 0 (timings not representative)
  max_load: float = 0.0  # > 0: before each round of timed calls, wait until the 1-minute load is below it
  max_wait_s: float = 300.0
  out: str = ""
  command: str = ""

  def resolved(self) -> Dict[str, Any]:
    if self.size not in SIZES:
      raise ValueError(f"--size={self.size!r}: choose one of {sorted(SIZES)}")
    values = dict(SIZES[self.size])
    for key in values:
      v = getattr(self, key)
      if v:
        values[key] = v
    if values["vqgan"] not in VQGAN_CHOICES:
      raise ValueError(f"--vqgan={values['vqgan']!r}: choose one of {list(VQGAN_CHOICES)}")
    return values

  def steps_list(self) -> List[int]:
    try:
      steps = [int(s) for s in self.teacher_steps.split(",") if s.strip()]
    except ValueError as e:
      raise ValueError(f"--teacher_steps={self.teacher_steps!r} is not a comma-separated list of integers") from e
    return steps

  def validate(self):
    for name in ("batch", "reps", "max_batch", "batch_multiple"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
    if self.warmup < 0 or self.budget_gb < 0 or not 0 < self.budget_fraction <= 1:
      raise ValueError("--warmup and --budget_gb must be >= 0 and --budget_fraction in (0, 1]")
    values = self.resolved()
    for s in self.steps_list():
      if not 1 <= s <= values["side"] ** 2:
        raise ValueError(f"--teacher_steps: {s} must be in [1, {values['side'] ** 2}]")


def vqgan_config(api, bm, choice: str, seq_len: int, codebook: int):
  full = api.vqgan.TamingConfig()
  if choice == "full":
    return dataclasses.replace(full, n_embed=codebook) if codebook != full.n_embed else full
  if choice == "reduced":  # the f16 layout at 256 px, 1/16 of the channels: 1/216 of the FLOPs
    return dataclasses.replace(full, ch=8, num_groups=8, n_embed=codebook)
  return bm.vqgan_config("small", seq_len, codebook)


def _is_oom(err: Exception) -> bool:
  text = f"{type(err).__name__}: {err}"
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_throughput(opts: Options) -> Dict[str, Any]:
  """Every row at ``opts.batch`` and (``opts.largest``) at the largest batch that fits; the record."""
  opts.validate()
  ca = compare_authors()
  bm = ca.load_benchmark()
  api = ca.project_api(bm)
  jax, jnp = bm.jax, bm.jnp
  v = opts.resolved()
  load_start = ca.load_average()
  spec = ca.Spec(depth=v["depth"], width=v["width"], heads=v["heads"], mlp_dim=v["mlp_dim"], side=v["side"],
                 codebook=v["codebook"], classes=v["classes"], dtype=v["dtype"], remat="none",
                 sample_guidance=opts.guidance, sample_steps=max(opts.steps_list() or [1]))
  spec.validate()
  cfg = ca.project_config(spec)
  sc = cfg.sample
  model = api.build_model(cfg.model, **bm.data_sizes(cfg))
  params = jax.jit(lambda k: api.init_params(model, k))(jax.random.key(opts.seed))
  vcfg = vqgan_config(api, bm, v["vqgan"], model.seq_len, model.codebook_size)
  vdtype = jnp.dtype(v["dtype"])
  vmodel = api.vqgan.TamingVQGAN(vcfg, dtype=vdtype)
  one = jnp.zeros((1, model.seq_len), jnp.int32)
  vvars = jax.jit(lambda k: vmodel.init(k, one, method="decode_tokens"))(jax.random.key(opts.seed + 1))
  key = jax.random.key(opts.seed + 2)
  apply_fn = lambda p, t, l: model.apply({"params": p}, t, l, deterministic=True)
  decode = lambda vv, tokens: api.vqgan.decode_tokens(vv, tokens, config=vcfg, dtype=vdtype)

  def teacher(steps):
    def sample(p, k, labels):
      return api.confidence_sampler(
          apply_fn, p, k, labels, seq_len=model.seq_len, codebook_size=model.codebook_size, steps=steps,
          schedule=sc.schedule, temperature=float(sc.temperature), r_temp=float(sc.r_temp),
          guidance=float(opts.guidance), guidance_schedule=sc.guidance_schedule, null_label=model.null_label)
    return sample

  def generator(p, k, labels):
    return api.one_step_generate(model, p, k, labels, r_init=float(sc.r_init), sigma=float(sc.sigma),
                                 temperature=float(sc.temperature))

  compile_ = lambda lowered: (lowered.compile(compiler_options=bm.FAST_COMPILE_OPTIONS) if opts.fast_compile
                              else lowered.compile())
  rows_spec = [("generator", 1, generator)] + [("teacher", s, teacher(s)) for s in opts.steps_list()]
  labels_of = lambda b: jnp.arange(b, dtype=jnp.int32) % model.num_classes
  compiled_cache: Dict[Any, Any] = {}

  def compile_e2e(name, steps, sampler, b):
    if (name, steps, b) not in compiled_cache:
      fn = lambda p, vv, k, labels: decode(vv, sampler(p, k, labels))
      t0 = time.perf_counter()
      compiled = compile_(jax.jit(fn).lower(params, vvars, key, jax.ShapeDtypeStruct((b,), jnp.int32)))
      compile_s = time.perf_counter() - t0
      try:
        est = api.estimated_bytes(compiled.memory_analysis())
      except Exception:  # pylint: disable=broad-except
        est = None
      compiled_cache[(name, steps, b)] = (compiled, est, compile_s)
    return compiled_cache[(name, steps, b)]

  searches: Dict[str, Dict[str, Any]] = {}
  limit = api.device_bytes_limit()
  if opts.budget_gb > 0:
    budget, budget_source = opts.budget_gb * 1e9, f"--budget_gb={opts.budget_gb:g}"
  elif limit:
    budget, budget_source = opts.budget_fraction * limit, (
        f"{opts.budget_fraction:g} x the device's bytes_limit ({limit / 1e9:.1f} GB)")
  else:
    budget, budget_source = CPU_DEFAULT_BUDGET_GB * 1e9, (
        "the default where the backend reports no device limit (the CPU); --budget_gb sets it")

  def round_down(b):
    m = opts.batch_multiple if b >= opts.batch_multiple else 1
    return max(1, min(opts.max_batch, b // m * m))

  def largest_batch(name, steps, sampler) -> Dict[str, Any]:
    """Largest batch whose estimate is within the budget, from the estimate's line in the batch.
    The teacher's memory does not depend on its step count (a loop): a second teacher row starts
    from the first one's batch and only checks it."""
    earlier = [f for f in searches.values() if f.get("sampler") == name and f.get("batch")]
    if earlier:
      b = earlier[0]["batch"]
      est = compile_e2e(name, steps, sampler, b)[1]
      if est is not None and est <= budget:
        return {**earlier[0], "steps": steps, "estimates": {str(b): est}, "reused_from_steps": earlier[0]["steps"]}
    b0 = opts.batch
    b1 = 2 * b0
    e0, e1 = compile_e2e(name, steps, sampler, b0)[1], compile_e2e(name, steps, sampler, b1)[1]
    if e0 is None or e1 is None:
      return {"sampler": name, "steps": steps, "batch": None, "why": "the backend gives no memory analysis"}
    slope = max((e1 - e0) / (b1 - b0), 1.0)
    intercept = e0 - slope * b0
    tried = {b0: e0, b1: e1}
    cand = round_down(int((budget - intercept) / slope))
    for _ in range(6):
      est = tried.get(cand)
      if est is None:
        est = compile_e2e(name, steps, sampler, cand)[1]
        tried[cand] = est
      if est <= budget:
        break
      cand = round_down(int(cand * budget / est * 0.98))
    fitting = [b for b, e in tried.items() if e <= budget]
    best = max(fitting) if fitting else None
    return {"sampler": name, "steps": steps, "batch": best, "bytes_per_image": slope, "fixed_bytes": intercept,
            "estimates": {str(b): e for b, e in sorted(tried.items())},
            "capped": best == opts.max_batch}

  def prepare(name, steps, sampler, b, setting) -> Dict[str, Any]:
    """Compiled, called once (smaller batches where a call runs out of memory) and warmed up."""
    for _ in range(4):
      compiled, est, compile_s = compile_e2e(name, steps, sampler, b)
      labels = labels_of(b)
      call = lambda c=compiled, l=labels: c(params, vvars, key, l)
      try:
        t0 = time.perf_counter()
        images = jax.block_until_ready(call())
        first = time.perf_counter() - t0
      except Exception as err:  # pylint: disable=broad-except
        if not _is_oom(err) or b <= 1:
          raise
        compiled_cache.pop((name, steps, b), None)
        b = round_down(int(b * 0.8))
        continue
      shape = tuple(int(d) for d in images.shape)
      del images
      for _ in range(opts.warmup):
        jax.block_until_ready(call())
      return {"sampler": name, "steps": steps, "batch": b, "setting": setting, "estimated_bytes": est,
              "compile_s": compile_s, "first_call_s": first, "image_shape": shape, "_call": call}
    raise RuntimeError(f"{name} ({steps} steps) ran out of memory down to batch {b}")

  def time_round_robin(entries):
    """``opts.reps`` rounds, each timing one call of every entry in turn, so that a change of the
    host's load hits every row alike; the median per entry."""
    for e in entries:
      e["times_s"] = []
    waits = []
    for _ in range(opts.reps):
      waits.append(ca.wait_for_load(opts.max_load, opts.max_wait_s)["waited_s"] if opts.max_load else 0.0)
      for e in entries:
        t0 = time.perf_counter()
        jax.block_until_ready(e["_call"]())
        e["times_s"].append(time.perf_counter() - t0)
    for e in entries:
      e.pop("_call")
      e["median_s"], e["min_s"] = statistics.median(e["times_s"]), min(e["times_s"])
      e["images_per_s"] = e["batch"] / e["median_s"]
      e["load_waits_s"] = waits

  setting = f"batch {opts.batch}"
  rows = [prepare(name, steps, sampler, opts.batch, setting) for name, steps, sampler in rows_spec]
  tokens = jnp.zeros((opts.batch, model.seq_len), jnp.int32)
  dec = compile_(jax.jit(decode).lower(vvars, tokens))
  jax.block_until_ready(dec(vvars, tokens))
  decode_only = {"sampler": "vqgan decode only", "steps": 0, "batch": opts.batch, "setting": setting,
                 "_call": lambda: dec(vvars, tokens)}
  time_round_robin(rows + [decode_only])
  if opts.largest:
    largest = []
    for name, steps, sampler in rows_spec:
      found = largest_batch(name, steps, sampler)
      searches[f"{name}_{steps}"] = found
      if found["batch"]:
        largest.append(prepare(name, steps, sampler, found["batch"], "largest that fits"))
    time_round_robin(largest)
    rows += largest
  # speed-up of the generator over each teacher row in the same setting
  for setting in {r["setting"] for r in rows}:
    gen = [r for r in rows if r["setting"] == setting and r["sampler"] == "generator"]
    for r in rows:
      if r["setting"] == setting and gen:
        r["generator_speedup"] = gen[0]["images_per_s"] / r["images_per_s"]

  tokens_per_forward = model.seq_len + 1
  forward_flops = 2.0 * bm.matmul_params(params) * tokens_per_forward + 4.0 * model.depth * tokens_per_forward ** 2 * model.width
  try:
    decode_flops = float(jax.jit(decode).lower(vvars, tokens[:1]).cost_analysis()["flops"])
  except Exception:  # pylint: disable=broad-except
    decode_flops = None
  info = bm.device_info()
  record = {
      "command": opts.command or "run_throughput(opts)",
      "date": datetime.date.today().isoformat(), "jax_version": jax.__version__,
      "python_version": platform.python_version(),
      "device": ca.cpu_model() if info["platform"] == "cpu" else info["device_kind"],
      "platform": info["platform"], "cpu_count": os.cpu_count(),
      "options": dataclasses.asdict(opts), "sizes": v,
      "model": {"params": api.count_params(params), "forward_flops_per_image": forward_flops,
                "seq_len": model.seq_len},
      "vqgan": {"config": dataclasses.asdict(vcfg), "params": api.count_params(vvars["params"]),
                "decode_flops_per_image": decode_flops, "dtype": str(vdtype)},
      "sampling": {"guidance": opts.guidance, "guidance_schedule": sc.guidance_schedule,
                   "temperature": float(sc.temperature), "r_temp": float(sc.r_temp),
                   "r_init": float(sc.r_init), "sigma": float(sc.sigma)},
      "budget_bytes": budget, "budget_source": budget_source, "largest_search": searches,
      "decode_only": decode_only, "rows": rows,
      "host_load_average": {"start": load_start, "end": ca.load_average()},
  }
  if opts.out:
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "throughput.json"), "w") as f:
      json.dump(record, f, indent=2)
    with open(os.path.join(opts.out, "throughput.md"), "w") as f:
      f.write(markdown(record))
  return record


def markdown(r: Dict[str, Any]) -> str:
  v, vq, m = r["sizes"], r["vqgan"], r["model"]
  h = r["rows"][0]["image_shape"][1] if r["rows"] else "?"
  cfg = vq["config"]
  head = [
      "# End-to-end throughput: sampler + VQGAN decode in one jit", "",
      f"- command: `{r['command']}`",
      f"- device: {r['device']} ({r['platform']}, {r['cpu_count']} CPU cores visible); date {r['date']}; "
      f"jax {r['jax_version']}; host load average {r['host_load_average']['start']} at the start, "
      f"{r['host_load_average']['end']} at the end",
      f"- transformer: {v['depth']} x {v['width']}, {v['heads']} heads, {v['side']}x{v['side']} + 1 tokens, "
      f"codebook {v['codebook']}, {v['classes']} classes, {m['params']:,} parameters, compute {v['dtype']}, "
      f"{m['forward_flops_per_image'] / 1e9:.3g} GFLOP per forward per image; random weights",
      f"- VQGAN: Taming decoder ({r['options']['size']} size '{v['vqgan']}': ch {cfg['ch']}, ch_mult "
      f"{tuple(cfg['ch_mult'])}, {h} px), {vq['params']:,} parameters, "
      + (f"{vq['decode_flops_per_image'] / 1e9:.3g} GFLOP per image" if vq["decode_flops_per_image"] else "")
      + f"; decode only, batch {r['options']['batch']}: {r['decode_only']['images_per_s']:.4g} images/s",
      f"- teacher: confidence sampler, guidance {r['sampling']['guidance']:g} {r['sampling']['guidance_schedule']}, "
      f"temperature {r['sampling']['temperature']:g}, r_temp {r['sampling']['r_temp']:g}; generator: "
      f"x_init with {r['sampling']['r_init']:g} masks, embedding noise {r['sampling']['sigma']:g}, one forward",
      f"- largest batch: the largest whose XLA estimate (arguments + outputs - aliased + temporaries) is within "
      f"{r['budget_bytes'] / 1e9:.3g} GB ({r['budget_source']}), capped at {r['options']['max_batch']}",
      f"- times: median of {r['options']['reps']} calls after a first call and {r['options']['warmup']} "
      "warm-up call(s); the rows of a setting timed in turn, one call each per round"
      + (f"; each round started once the 1-minute load average was below {r['options']['max_load']:g} "
         f"(or after {r['options']['max_wait_s']:g} s)" if r["options"].get("max_load") else ""),
      "",
      "| sampler | batch | XLA estimate (GB) | s per batch | images / s | generator's speed-up |",
      "|---|---|---|---|---|---|",
  ]
  body = []
  for row in r["rows"]:
    name = "one-step generator" if row["sampler"] == "generator" else f"teacher, {row['steps']} steps"
    est = "n/a" if row["estimated_bytes"] is None else f"{row['estimated_bytes'] / 1e9:.3g}"
    batch = f"{row['batch']}" + (" (largest)" if row["setting"] != f"batch {r['options']['batch']}" else "")
    body.append(f"| {name} | {batch} | {est} | {row['median_s']:.4g} | {row['images_per_s']:.4g} | "
                f"{row.get('generator_speedup', float('nan')):.2f}x |")
  return "\n".join(head + body) + "\n"


def parse_args(argv) -> Options:
  d = Options()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default=d.size, choices=sorted(SIZES))
  for name in ("depth", "width", "heads", "mlp_dim", "side", "codebook", "classes"):
    p.add_argument("--" + name, type=int, default=0, help="override the size's (0: keep)")
  p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"])
  p.add_argument("--vqgan", default="", choices=["", *VQGAN_CHOICES])
  p.add_argument("--batch", type=int, default=d.batch)
  p.add_argument("--teacher_steps", default=d.teacher_steps)
  p.add_argument("--guidance", type=float, default=d.guidance)
  p.add_argument("--nolargest", dest="largest", action="store_false", help="time only at --batch")
  p.add_argument("--budget_gb", type=float, default=d.budget_gb)
  p.add_argument("--budget_fraction", type=float, default=d.budget_fraction)
  p.add_argument("--max_batch", type=int, default=d.max_batch)
  p.add_argument("--batch_multiple", type=int, default=d.batch_multiple)
  p.add_argument("--reps", type=int, default=d.reps)
  p.add_argument("--warmup", type=int, default=d.warmup)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--fast_compile", action="store_true",
                 help="smoke runs: compile at XLA optimisation level 0 (slower code)")
  p.add_argument("--max_load", type=float, default=d.max_load,
                 help="a shared host: before each round of timed calls wait until the 1-minute load is below this")
  p.add_argument("--max_wait_s", type=float, default=d.max_wait_s, help="longest wait for --max_load")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  return Options(command=" ".join(shlex.quote(a) for a in ["python", "experiments/throughput.py", *argv]),
                 **vars(args))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  record = run_throughput(parse_args(argv))
  print(markdown(record))
  return record


if __name__ == "__main__":
  main()
