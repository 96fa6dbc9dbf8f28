"""Speed of the Di[M]O distillation step and of sampling, on whatever devices are present.

  python experiments/benchmark.py --config=configs/maskgit.py --out=/tmp/bench
  python experiments/benchmark.py --config=configs/maskgit.py --config.model.depth=2 \
      --config.model.width=128 --config.model.heads=4 --batch=8 --sample_batch=8 --out=/tmp/bench_small

Random weights of the config's model (full MaskGIT size for ``configs/maskgit.py``). Measured:

- the distillation step (``Distiller.step``: one generator and ``aux_updates`` auxiliary
  updates): lowering and compile time (``jit(...).lower(...).compile()``), then the median of
  ``--steps`` timed steps after ``--warmup`` untimed ones, each synchronised with
  ``jax.block_until_ready``;
- peak device memory after the step (``device.memory_stats()['peak_bytes_in_use']`` where the
  backend reports it; XLA's compiled-memory estimate and the host's peak RSS always);
- FLOPs per step: counted by XLA (``compiled.cost_analysis()``, which counts a scanned layer
  stack once, and the lowered step of the same network unrolled, which counts every layer) and
  analytic (forward-equivalents x 2 x matmul parameters x tokens, plus attention scores); model
  FLOPs utilisation against ``--peak_tflops`` or a table of known bf16 dense peaks;
- sampling throughput: the teacher's confidence sampler (``--sample_steps``, default the
  config's, with the config's guidance) and the one-step generator, each with and without
  decoding to pixels by a Taming VQGAN with random weights (``--skip_vqgan`` to leave it out).

Levers: ``--attention=xla|cudnn|xla_saved``, ``--teacher_dtype=bfloat16``, ``--remat=none|full|dots|dots_no_batch``, ``--donate=false``,
``--config.model.logits_dtype=bfloat16``, ``--config.model.dtype=...``.
Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` and prints the table.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dimo_jax.core import memory as device_memory, samplers, sharding
from dimo_jax.method import dimo
from dimo_jax.networks import attention, maskgit, vqgan

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), matched in order against
# ``device.device_kind`` (lower case). Our H200 reference measured about 790 TFLOP/s in a bf16
# matmul; pass ``--peak_tflops=790`` to rate against that instead.
PEAK_TFLOPS_BF16 = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
)

# Authors' PyTorch implementation and a plain JAX version on one H200, full MaskGIT size,
# batch 64, bf16 (reference notes, section 4, 2026-11-26); goals from issue 6.
REFERENCE = {
    "step_s": 0.53,
    "step_s_plain_jax": 0.39,
    "compile_s_plain_jax": 35.0,
    "peak_memory_gb": 33.6,
    "teacher_16_steps_64_images_s": 1.5,
    "generator_1_step_64_images_s": 0.056,
    "generator_1_step_64_images_s_plain_jax": 0.030,
    "flops_per_step_tflop": 60.0,
    "measured_bf16_peak_tflops": 790.0,
}
GOALS = {
    "step_s": 0.15,
    "peak_memory_gb": 24.0,
    "compile_s": 60.0,
    "generator_1_step_64_images_s": 0.012,
}
REFERENCE_SHAPE = dict(arch="preln", width=768, depth=24, heads=16, seq_len=256, codebook_size=1024,
                       num_classes=1000, batch=64, sample_batch=64, dtype="bfloat16")

# Compiler options of ``--fast_compile`` (about half the CPU compile time; the step's timings then
# do not represent optimised code).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}

ATTENTION_CHOICES = attention.IMPLEMENTATIONS
REMAT_CHOICES = ("", "none", *maskgit.REMAT_POLICIES)
VQGAN_CHOICES = ("auto", "full", "small")


@dataclasses.dataclass
class BenchmarkOptions:
  """What to measure. Empty strings and zeros keep the config's value."""
  out: str = ""
  steps: int = 10
  warmup: int = 2
  batch: int = 0  # 0: config.distill.batch_size
  sample_batch: int = 64
  sample_steps: int = 0  # 0: config.sample.steps
  sample_reps: int = 5
  skip_sampling: bool = False
  skip_vqgan: bool = False
  vqgan: str = "auto"  # auto: the f16 256 px model when the tokens are 16 x 16, else a small one
  attention: str = ""  # '' (config's) | xla | cudnn | xla_saved (dimo_jax.networks.attention)
  teacher_dtype: str = ""  # '' (the model's param_dtype) | bfloat16 | float32: the frozen teacher's parameters
  remat: str = ""  # '' (config's) | none | full | dots | dots_no_batch
  donate: bool = True
  peak_tflops: float = 0.0  # 0: PEAK_TFLOPS_BF16 by device kind
  count_unrolled: bool = True
  fast_compile: bool = False  # CPU smoke runs: XLA backend optimisation level 0 for the step
  seed: int = 0
  command: str = ""
  config_file: str = ""

  def validate(self):
    for name in ("steps", "sample_batch", "sample_reps"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
    for name in ("warmup", "batch", "sample_steps", "seed"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
    if self.attention not in ATTENTION_CHOICES:
      raise ValueError(f"--attention={self.attention!r} is not valid; choose one of {list(ATTENTION_CHOICES[1:])} "
                       "(or leave it empty for the config's model.attention_impl)")
    if self.teacher_dtype not in ("", "float32", "bfloat16"):
      raise ValueError(f"--teacher_dtype={self.teacher_dtype!r} is not valid; choose float32 or bfloat16 "
                       "(or leave it empty for the model's param_dtype)")
    if self.remat not in REMAT_CHOICES:
      raise ValueError(f"--remat={self.remat!r} is not valid; choose one of {list(REMAT_CHOICES[1:])}")
    if self.vqgan not in VQGAN_CHOICES:
      raise ValueError(f"--vqgan={self.vqgan!r} is not valid; choose one of {list(VQGAN_CHOICES)}")
    if not (self.peak_tflops >= 0 and math.isfinite(self.peak_tflops)):
      raise ValueError(f"--peak_tflops={self.peak_tflops} must be a finite number >= 0 (0 = table)")


# ---------------------------------------------------------------------------- config and sizes


def prepare_config(config, opts: BenchmarkOptions) -> ml_collections.ConfigDict:
  """A resolved, unlocked copy of ``config`` with the options' overrides applied."""
  cfg = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") \
      else ml_collections.ConfigDict(config)
  cfg.unlock()
  for section in ("data", "model", "distill", "teacher", "sample"):
    if section not in cfg:
      raise ValueError(f"the config has no '{section}' section; start from configs/digits.py "
                       "or configs/maskgit.py")
  if opts.attention:
    cfg.model.attention_impl = opts.attention
  if opts.remat:
    cfg.model.remat = opts.remat
  if opts.batch:
    cfg.distill.batch_size = int(opts.batch)
  return cfg


def data_sizes(cfg) -> Dict[str, int]:
  """``codebook_size``, ``seq_len`` and ``num_classes`` read from ``config.data``."""
  d = cfg.data
  k = int(d.get("vocab_size", 0) or 0)
  if k < 1:
    raise ValueError(f"config.data.vocab_size={k}: the benchmark needs the codebook size; "
                     "set --config.data.vocab_size=1024 (MaskGIT) or another positive value")
  seq_len = int(d.get("seq_len", 0) or 0)
  if seq_len < 1:
    shape = d.get("image_shape", None)
    if not shape:
      raise ValueError("config.data.seq_len is missing and config.data.image_shape is empty; "
                       "set --config.data.seq_len=<tokens per sample>")
    seq_len = int(np.prod(shape))
  c = int(d.get("num_classes", -1))
  if c < 0:
    raise ValueError(f"config.data.num_classes={c}: the benchmark has no data to infer it from; "
                     "set --config.data.num_classes=1000 (ImageNet) or 0 (unconditional)")
  return {"codebook_size": k, "seq_len": seq_len, "num_classes": c}


def device_info() -> Dict[str, Any]:
  devices = jax.devices()
  d0 = devices[0]
  kind = str(d0.device_kind)
  if d0.platform == "cpu":
    kind = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
  return {"backend": jax.default_backend(), "platform": d0.platform, "device_kind": kind,
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "process_count": jax.process_count()}


def peak_flops_per_device(opts: BenchmarkOptions):
  """(FLOP/s or None, where the figure came from)."""
  if opts.peak_tflops > 0:
    return opts.peak_tflops * 1e12, "--peak_tflops"
  d0 = jax.devices()[0]
  if d0.platform == "cpu":
    return None, "none for CPU (pass --peak_tflops)"
  kind = str(d0.device_kind).lower()
  for key, tflops in PEAK_TFLOPS_BF16:
    if key in kind:
      return tflops * 1e12, f"table: {key} bf16 dense {tflops:g} TFLOP/s"
  return None, f"unknown device kind {d0.device_kind!r} (pass --peak_tflops)"


# ---------------------------------------------------------------------------- FLOPs


def forward_equivalents(settings: dimo.DistillSettings) -> int:
  """Forward passes (a backward counted as two) of one sample in one Di[M]O step.

  Generator update: generator forward, teacher (two branches with guidance), auxiliary
  forward, generator backward (2); ``grad_input='sample'`` adds a second generator forward.
  Each auxiliary update: generator forward, auxiliary forward and backward (1 + 1 + 2).
  """
  guided = settings.guidance != 1.0 or settings.guidance_schedule != "constant"
  gen = 1 + (2 if guided else 1) + 1 + 2 + (1 if settings.grad_input == "sample" else 0)
  return gen + 4 * settings.aux_updates


def matmul_params(params) -> int:
  """Parameters used in a matrix product per token: every Dense kernel plus the token
  embedding (the output head is tied to it); position embeddings, biases, norms excluded."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(p, "key", str(p)) for p in path]
    if names[-1] == "kernel" or (names[0] == "tok_emb" and names[-1] == "embedding"):
      total += int(np.prod(leaf.shape))
  return total


def analytic_flops(model, params, settings: dimo.DistillSettings, batch: int) -> Dict[str, float]:
  """Forward-equivalents x batch x (2 x matmul params x tokens + attention scores 4 T^2 d per layer)."""
  tokens = model.seq_len + 1  # visual tokens and the class token
  n = matmul_params(params)
  dense = 2.0 * n * tokens
  attention = 4.0 * model.depth * tokens * tokens * model.width
  fe = forward_equivalents(settings)
  return {"forward_equivalents": fe, "matmul_params": n, "tokens": tokens,
          "forward_flops_per_sample": dense + attention,
          "per_step": float(fe * batch * (dense + attention))}


def cost_flops(analysis) -> Optional[float]:
  if analysis is None:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  value = float(analysis["flops"])
  return value if value > 0 else None


def counted_unrolled_flops(cfg, sizes, teacher_shapes_seed: int = 0) -> Optional[float]:
  """XLA's count on the lowered (unoptimised) step of the same network with the layers unrolled,
  from abstract shapes only (nothing is allocated or compiled)."""
  model_cfg = cfg.model.copy_and_resolve_references()
  model_cfg.unlock()
  model_cfg.scan = False
  model = maskgit.build_model(model_cfg, **sizes)
  dist = dimo.build_distiller(cfg, model)
  key = jax.random.key(teacher_shapes_seed)
  abstract = jax.eval_shape(lambda: dist.init_state(maskgit.init_params(model, key), 0))
  try:
    return cost_flops(jax.jit(dist.step).lower(abstract).cost_analysis())
  except Exception:  # pylint: disable=broad-except
    return None


# ---------------------------------------------------------------------------- memory


def device_peak_bytes() -> Optional[int]:
  """The largest ``peak_bytes_in_use`` over local devices, or None where not reported."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def host_peak_rss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def compiled_memory(compiled) -> Optional[Dict[str, int]]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  if isinstance(m, (list, tuple)):
    m = m[0]
  out = {}
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
               "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes"):
    if hasattr(m, name):
      out[name] = int(getattr(m, name))
  estimate = device_memory.estimated_bytes(m)  # arguments + outputs not aliased to them + temporaries
  if estimate is not None:
    out["estimated_bytes"] = estimate
  return out or None


# ---------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any], reps: int, warmup: int) -> Dict[str, Any]:
  """First call (compile + run), ``warmup`` untimed calls, then ``reps`` synchronised calls."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times),
          "times_s": times}


def _compile(lowered, opts: BenchmarkOptions):
  if opts.fast_compile:
    return lowered.compile(compiler_options=FAST_COMPILE_OPTIONS)
  return lowered.compile()


def _compile_step(dist: dimo.Distiller, state, mesh, donate: bool):
  """(jitted step, placed state): ``Distiller.jit_step``, or the same without donation."""
  fn, placed = dist.jit_step(state, mesh)
  if donate:
    return fn, placed
  if mesh is None:
    return jax.jit(dist.step), placed
  shardings = sharding.fsdp_shardings(state, mesh)
  fn = jax.jit(dist.step, in_shardings=(shardings,),
               out_shardings=(shardings, sharding.replicated(mesh)))
  return fn, placed


def bench_step(cfg, model, teacher_params, opts: BenchmarkOptions) -> Dict[str, Any]:
  dist = dimo.build_distiller(cfg, model)
  batch = dist.s.batch_size
  mesh = None
  if jax.device_count() > 1:
    mesh = sharding.make_mesh(int(cfg.mesh.get("data", -1)), int(cfg.mesh.get("fsdp", 1)))
  state = dist.init_state(teacher_params, seed=opts.seed)
  if opts.teacher_dtype:  # the frozen teacher held in that dtype, without a float32 copy
    state = state.replace(teacher_params=maskgit.cast_floating(state.teacher_params, opts.teacher_dtype))
  fn, state = _compile_step(dist, state, mesh, opts.donate)
  t0 = time.perf_counter()
  lowered = fn.lower(state)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = _compile(lowered, opts)
  compile_s = time.perf_counter() - t0
  try:
    counted = cost_flops(compiled.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    counted = None
  memory = compiled_memory(compiled)
  device_memory.check_fits(compiled, device_memory.device_bytes_limit())  # a clear error instead of an allocator failure

  metrics = None
  for _ in range(opts.warmup):
    state, metrics = compiled(state)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(opts.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  finite = bool(all(np.isfinite(float(v)) for k, v in metrics.items() if not k.endswith("nan_count")))
  median = statistics.median(times)
  del state, metrics
  gc.collect()
  return {
      "batch": batch, "steps": opts.steps, "warmup": opts.warmup, "donate": opts.donate,
      "mesh": None if mesh is None else dict(mesh.shape),
      "median_s": median, "min_s": min(times), "mean_s": statistics.fmean(times), "times_s": times,
      "samples_per_s": batch / median, "lower_s": lower_s, "compile_s": compile_s,
      "lower_and_compile_s": lower_s + compile_s, "metrics_finite": finite,
      "counted_flops_compiled": counted, "compiled_memory": memory,
      "forward_equivalents": forward_equivalents(dist.s),
  }


# ---------------------------------------------------------------------------- sampling


def vqgan_config(choice: str, seq_len: int, codebook_size: int) -> vqgan.TamingConfig:
  """The f16 ImageNet Taming VQGAN (``full``), or a small two-level one sized to the tokens."""
  full = vqgan.TamingConfig()
  side = int(round(math.sqrt(seq_len)))
  if side * side != seq_len:
    raise ValueError(f"VQGAN decoding needs a square token grid, but the sequence length is {seq_len}; "
                     "pass --skip_vqgan")
  if choice == "full" or (choice == "auto" and side == full.latent_size):
    if side != full.latent_size:
      raise ValueError(f"--vqgan=full decodes {full.latent_size}x{full.latent_size} tokens, but the "
                       f"sequence length is {seq_len}; use --vqgan=small or --skip_vqgan")
    return full
  small = vqgan.TamingConfig.small()
  return dataclasses.replace(small, resolution=side * small.downsample_factor,
                             attn_resolutions=(side,), n_embed=codebook_size)


def _aot(fn: Callable, args, opts: BenchmarkOptions):
  """(compiled ``jax.jit(fn)`` for ``args``, lowering seconds, compile seconds)."""
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = _compile(lowered, opts)
  return compiled, lower_s, time.perf_counter() - t0


def bench_sampling(cfg, model, params, opts: BenchmarkOptions) -> Dict[str, Any]:
  """Teacher (confidence sampler with guidance) and one-step generator throughput on one device,
  each without and with Taming VQGAN decoding (the decoder called after the sampler)."""
  sc = cfg.sample
  batch = opts.sample_batch
  steps = int(opts.sample_steps or sc.get("steps", 16))
  if not 1 <= steps <= model.seq_len:
    raise ValueError(f"--sample_steps={steps} must be in [1, {model.seq_len}] (the sequence length)")
  guidance = float(sc.get("guidance", 1.0))
  g_schedule = sc.get("guidance_schedule", "constant")
  if model.num_classes == 0 or not model.has_null_class:
    guidance, g_schedule = 1.0, "constant"
  c = model.num_classes
  dev = jax.devices()[0]
  params = jax.device_put(params, dev)
  labels = jax.device_put(jnp.asarray(np.arange(batch) % c if c else np.zeros(batch), jnp.int32), dev)
  key = jax.device_put(jax.random.key(opts.seed + 1), dev)
  apply_fn = lambda p, t, l: model.apply({"params": p}, t, l, deterministic=True)
  temperature = float(sc.get("temperature", 1.0))

  def teacher_fn(p, k, l):
    return samplers.confidence_sampler(
        apply_fn, p, k, l, seq_len=model.seq_len, codebook_size=model.codebook_size, steps=steps,
        schedule=sc.get("schedule", "arccos"), temperature=temperature, r_temp=float(sc.get("r_temp", 4.5)),
        guidance=guidance, guidance_schedule=g_schedule,
        null_label=model.null_label if model.has_null_class else None)

  generator_fn = functools.partial(samplers.one_step_generate, model, r_init=float(sc.get("r_init", 0.6)),
                                   sigma=float(sc.get("sigma", 0.1)), temperature=temperature)
  out = {"batch": batch, "devices": 1, "teacher_steps": steps, "guidance": guidance,
         "guidance_schedule": g_schedule}
  compiled = {}
  for name, fn in (("teacher", teacher_fn), ("generator", generator_fn)):
    compiled[name], lower_s, compile_s = _aot(fn, (params, key, labels), opts)
    call = functools.partial(compiled[name], params, key, labels)
    out[name] = {**_timed(call, opts.sample_reps, 1), "lower_s": lower_s, "compile_s": compile_s}

  out["vqgan"] = None
  if not opts.skip_vqgan:
    vcfg = vqgan_config(opts.vqgan, model.seq_len, model.codebook_size)
    dtype = maskgit.to_dtype(cfg.model.get("dtype", "float32"))
    vmodel = vqgan.TamingVQGAN(vcfg, dtype=dtype)
    tokens = jax.block_until_ready(compiled["generator"](params, key, labels))
    init, _, _ = _aot(lambda k: vmodel.init(k, tokens[:1], method="decode_tokens"),
                      (jax.random.key(opts.seed + 2),), opts)
    variables = init(jax.random.key(opts.seed + 2))
    variables = jax.device_put(variables, dev)
    decode, lower_s, compile_s = _aot(
        lambda v, t: vqgan.decode_tokens(v, t, config=vcfg, dtype=dtype), (variables, tokens), opts)
    out["vqgan"] = {"config": dataclasses.asdict(vcfg), "dtype": jnp.dtype(dtype).name,
                    "params": maskgit.count_params(variables["params"]), "image_size": vcfg.resolution,
                    "lower_s": lower_s, "compile_s": compile_s}
    teacher, generator = compiled["teacher"], compiled["generator"]
    for name, fn in (("vqgan_decode", lambda: decode(variables, tokens)),
                     ("teacher_vqgan", lambda: decode(variables, teacher(params, key, labels))),
                     ("generator_vqgan", lambda: decode(variables, generator(params, key, labels)))):
      out[name] = _timed(fn, opts.sample_reps, 1)
  for name in ("teacher", "generator", "vqgan_decode", "teacher_vqgan", "generator_vqgan"):
    if name in out:
      out[name]["images_per_s"] = batch / out[name]["median_s"]
  return out


# ---------------------------------------------------------------------------- the run


def _shape_summary(cfg, model, batch, sample_batch) -> Dict[str, Any]:
  return dict(arch=cfg.model.get("arch", "preln"), width=model.width, depth=model.depth, heads=model.heads,
              mlp_dim=model.mlp_dim, seq_len=model.seq_len, codebook_size=model.codebook_size,
              num_classes=model.num_classes, batch=batch, sample_batch=sample_batch,
              dtype=jnp.dtype(model.dtype).name, param_dtype=jnp.dtype(model.param_dtype).name,
              logits_dtype=jnp.dtype(model.logits_dtype).name, scan=model.scan, remat=model.remat,
              attention=model.attention_impl or "auto (JAX's choice)", dropout=model.dropout)


def run_benchmark(config, opts: BenchmarkOptions) -> Dict[str, Any]:
  """Runs every measurement; writes ``<opts.out>/benchmark.{json,md}`` when ``opts.out`` is set.
  Returns the JSON record (a dict of plain Python values)."""
  opts.validate()
  load_start = _load_average()
  cfg = prepare_config(config, opts)
  sizes = data_sizes(cfg)
  info = device_info()
  if cfg.model.get("attention_impl", "") == "cudnn" and info["platform"] != "gpu":
    raise ValueError(f"--attention=cudnn needs an NVIDIA GPU, but the backend is {info['platform']}; "
                     "use --attention=xla")
  model = maskgit.build_model(cfg.model, **sizes)
  t0 = time.perf_counter()
  init, _, _ = _aot(lambda k: maskgit.init_params(model, k), (jax.random.key(opts.seed),), opts)
  teacher_params = jax.block_until_ready(init(jax.random.key(opts.seed)))
  init_s = time.perf_counter() - t0
  n_params = maskgit.count_params(teacher_params)

  step = bench_step(cfg, model, teacher_params, opts)
  peak_step = device_peak_bytes()
  settings = dimo.DistillSettings.from_config(cfg)
  flops = analytic_flops(model, teacher_params, settings, step["batch"])
  counted_unrolled = counted_unrolled_flops(cfg, sizes) if opts.count_unrolled else None
  peak, peak_source = peak_flops_per_device(opts)
  n_dev = info["device_count"]
  total_peak = peak * n_dev if peak else None

  def rate(value):
    return None if value is None else value / step["median_s"]

  def util(value):
    return None if (value is None or total_peak is None) else value / step["median_s"] / total_peak

  flop_record = {
      "analytic_per_step": flops["per_step"], "forward_equivalents": flops["forward_equivalents"],
      "matmul_params": flops["matmul_params"], "tokens": flops["tokens"],
      "forward_flops_per_sample": flops["forward_flops_per_sample"],
      "counted_compiled_per_step": step.pop("counted_flops_compiled"),
      "counted_unrolled_per_step": counted_unrolled,
      "peak_flops_per_device": peak, "peak_source": peak_source,
      "achieved_flops_analytic": rate(flops["per_step"]),
      "achieved_flops_counted": rate(counted_unrolled),
      "mfu_analytic": util(flops["per_step"]), "mfu_counted": util(counted_unrolled),
  }
  sampling = None if opts.skip_sampling else bench_sampling(cfg, model, teacher_params, opts)
  memory = {
      "peak_device_bytes_after_step": peak_step,
      "peak_device_bytes_end": device_peak_bytes(),
      "device_source": ("device.memory_stats()['peak_bytes_in_use'] (process lifetime)"
                        if peak_step is not None else f"not reported by the {info['platform']} backend"),
      "compiled_step": step.pop("compiled_memory"),
      "host_peak_rss_bytes": host_peak_rss_bytes(),
  }
  shape = _shape_summary(cfg, model, step["batch"], opts.sample_batch)
  comparable = (all(shape[k] == v for k, v in REFERENCE_SHAPE.items()) and n_dev == 1)
  record = {
      "command": opts.command or "run_benchmark(config, opts)",
      "config_file": opts.config_file,
      "date": datetime.date.today().isoformat(),
      "jax_version": jax.__version__,
      "python_version": platform.python_version(),
      **info,
      "model": shape, "params": n_params, "param_init_s": init_s,
      "distill": {"guidance": settings.guidance, "guidance_schedule": settings.guidance_schedule,
                  "aux_updates": settings.aux_updates, "divergence": settings.divergence,
                  "teacher_dropout": settings.teacher_dropout, "gen_dropout": settings.gen_dropout,
                  "aux_dropout": settings.aux_dropout},
      "options": dataclasses.asdict(opts),
      "step": step, "memory": memory, "flops": flop_record, "sampling": sampling,
      "comparable_to_reference": comparable, "reference": REFERENCE, "goals": GOALS,
      "host_load_average": {"start": load_start, "end": _load_average()},
  }
  record = _plain(record)
  if opts.out:
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "benchmark.json"), "w") as f:
      json.dump(record, f, indent=2, sort_keys=False)
    with open(os.path.join(opts.out, "benchmark.md"), "w") as f:
      f.write(markdown(record))
  return record


def _load_average() -> Optional[list]:
  """The host's 1, 5 and 15 minute load averages (timings on a shared host are noisy)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _plain(x):
  """JSON-ready copy: NumPy scalars to Python, tuples to lists."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


# ---------------------------------------------------------------------------- markdown


def _fmt(value, scale=1.0, digits=3, unit=""):
  if value is None:
    return "n/a"
  return f"{value * scale:.{digits}g}{unit}"


def markdown(r: Dict[str, Any]) -> str:
  """The run as a markdown table: this run, the authors' H200 reference and the issue-6 goals."""
  m, s, fl, mem = r["model"], r["step"], r["flops"], r["memory"]
  cmp_ = r["comparable_to_reference"]
  ref, goal = r["reference"], r["goals"]

  def ratio(ref_value, ours):
    if not cmp_ or ours is None or ours <= 0:
      return ""
    return f" ({ref_value / ours:.2f}x)"

  peak_gb = None if mem["peak_device_bytes_after_step"] is None else mem["peak_device_bytes_after_step"] / 1e9
  est = (mem["compiled_step"] or {}).get("estimated_bytes")
  xla_peak = (mem["compiled_step"] or {}).get("peak_memory_in_bytes")
  rows = [
      ("distillation step, median (s)", _fmt(s["median_s"], digits=4) + ratio(ref["step_s"], s["median_s"]),
       f"{ref['step_s']} (plain JAX {ref['step_s_plain_jax']})", f"<= {goal['step_s']}"),
      ("step, min / mean (s)", f"{_fmt(s['min_s'], digits=4)} / {_fmt(s['mean_s'], digits=4)}", "", ""),
      ("samples per second (step)", _fmt(s["samples_per_s"], digits=4), "", ""),
      ("lower + compile (s)", f"{_fmt(s['lower_s'])} + {_fmt(s['compile_s'])}",
       f"{ref['compile_s_plain_jax']} (plain JAX)", f"<= {goal['compile_s']}"),
      ("peak device memory after step (GB)", _fmt(peak_gb, digits=4), f"{ref['peak_memory_gb']}",
       f"<= {goal['peak_memory_gb']}"),
      ("XLA estimate: arguments + outputs - aliased + temporaries (GB)", _fmt(est, 1e-9, 4), "", ""),
      ("XLA peak_memory_in_bytes of the step (GB)", _fmt(xla_peak, 1e-9, 4), "", ""),
      ("host peak RSS (GB)", _fmt(mem["host_peak_rss_bytes"], 1e-9, 4), "", ""),
      ("FLOPs per step, analytic (TFLOP)",
       f"{_fmt(fl['analytic_per_step'], 1e-12, 4)} ({fl['forward_equivalents']} fwd-eq)",
       f"~{ref['flops_per_step_tflop']:g}", ""),
      ("FLOPs per step, XLA unrolled (TFLOP)", _fmt(fl["counted_unrolled_per_step"], 1e-12, 4), "", ""),
      ("FLOPs per step, XLA compiled (TFLOP, scan body once)",
       _fmt(fl["counted_compiled_per_step"], 1e-12, 4), "", ""),
      ("achieved TFLOP/s (analytic / unrolled count)",
       f"{_fmt(fl['achieved_flops_analytic'], 1e-12, 4)} / {_fmt(fl['achieved_flops_counted'], 1e-12, 4)}",
       "", ""),
      ("MFU (analytic / unrolled count)", f"{_fmt(fl['mfu_analytic'])} / {_fmt(fl['mfu_counted'])}",
       f"floor 0.075 s at {ref['measured_bf16_peak_tflops']:g} TFLOP/s", ""),
      ("peak FLOP/s per device", f"{_fmt(fl['peak_flops_per_device'], 1e-12, 4, ' T')} ({fl['peak_source']})",
       "", ""),
  ]
  sp = r.get("sampling")
  if sp:
    n = sp["batch"]
    t, g = sp["teacher"], sp["generator"]
    rows += [
        (f"teacher {sp['teacher_steps']} steps, w={sp['guidance']:g} {sp['guidance_schedule']}, "
         f"{n} images (s)",
         _fmt(t["median_s"], digits=4) + ratio(ref["teacher_16_steps_64_images_s"], t["median_s"]),
         f"{ref['teacher_16_steps_64_images_s']}", ""),
        (f"generator 1 step, {n} images (ms)",
         _fmt(g["median_s"], 1e3, 4) + ratio(ref["generator_1_step_64_images_s"], g["median_s"]),
         f"{ref['generator_1_step_64_images_s'] * 1e3:g} (plain JAX "
         f"{ref['generator_1_step_64_images_s_plain_jax'] * 1e3:g})",
         f"<= {goal['generator_1_step_64_images_s'] * 1e3:g}"),
        ("images per second: teacher / generator",
         f"{_fmt(t['images_per_s'], digits=4)} / {_fmt(g['images_per_s'], digits=4)}", "", ""),
    ]
    if sp.get("vqgan"):
      v = sp["vqgan"]
      rows += [
          (f"VQGAN decode only, {v['image_size']} px, {n} images (ms)",
           _fmt(sp["vqgan_decode"]["median_s"], 1e3, 4), "", ""),
          (f"teacher + VQGAN, {n} images (s)", _fmt(sp["teacher_vqgan"]["median_s"], digits=4), "", ""),
          (f"generator + VQGAN, {n} images (ms)", _fmt(sp["generator_vqgan"]["median_s"], 1e3, 4), "", ""),
      ]
  head = [
      "# Di[M]O benchmark", "",
      f"- command: `{r['command']}`",
      f"- device: {r['device_kind']} x {r['device_count']} ({r['backend']}), date {r['date']}, "
      f"jax {r['jax_version']}"
      + (f", host load average {r['host_load_average']['start']} at the start"
         if r.get("host_load_average", {}).get("start") and r["platform"] == "cpu" else ""),
      f"- model: {m['arch']} {m['depth']} x {m['width']}, {m['heads']} heads, {r['params']:,} parameters, "
      f"{m['seq_len']} tokens, codebook {m['codebook_size']}, {m['num_classes']} classes; compute "
      f"{m['dtype']}, params {m['param_dtype']}, logits {m['logits_dtype']}; attention {m['attention']}, "
      f"remat {m['remat']}, scan {m['scan']}, donation {s['donate']}"
      + (" (step compiled at XLA backend optimisation level 0: --fast_compile)"
         if r["options"].get("fast_compile") else ""),
      f"- step: batch {s['batch']}, {s['warmup']} warm-up + {s['steps']} timed steps; teacher guidance "
      f"{r['distill']['guidance']:g}, {r['distill']['aux_updates']} auxiliary update(s)",
      "- reference column: the authors' PyTorch step and a plain JAX step on one H200, full MaskGIT "
      "size, batch 64, bf16 (reference notes, section 4); goal column: issue 6. "
      + ("Ratios (reference / this run) in brackets." if cmp_ else
         "This run's shape differs from the reference, so no ratios are given."),
      "",
      "| quantity | this run | reference (H200) | goal |",
      "|---|---|---|---|",
  ]
  body = [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
  return "\n".join(head + body) + "\n"


# ---------------------------------------------------------------------------- command line


def define_flags(flag_values, sys_argv=None):
  """The command-line flags (defined on ``flag_values``, only when run as a script); ``sys_argv``
  (default ``sys.argv``) is where the ``--config.key=value`` overrides are read from."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  d = BenchmarkOptions()
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py).",
                                  flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("out", None, "Directory for benchmark.json and benchmark.md.", flag_values=flag_values)
  flags.DEFINE_integer("steps", d.steps, "Timed distillation steps.", flag_values=flag_values)
  flags.DEFINE_integer("warmup", d.warmup, "Untimed steps after compiling.", flag_values=flag_values)
  flags.DEFINE_integer("batch", d.batch, "Global distillation batch (0: config.distill.batch_size).",
                       flag_values=flag_values)
  flags.DEFINE_integer("sample_batch", d.sample_batch, "Images per sampling call.", flag_values=flag_values)
  flags.DEFINE_integer("sample_steps", d.sample_steps, "Teacher sampler steps (0: config.sample.steps).",
                       flag_values=flag_values)
  flags.DEFINE_integer("sample_reps", d.sample_reps, "Timed calls per sampling measurement.",
                       flag_values=flag_values)
  flags.DEFINE_bool("skip_sampling", d.skip_sampling, "Measure only the distillation step.",
                    flag_values=flag_values)
  flags.DEFINE_bool("skip_vqgan", d.skip_vqgan, "Leave out VQGAN decoding.", flag_values=flag_values)
  flags.DEFINE_enum("vqgan", d.vqgan, list(VQGAN_CHOICES),
                    "Taming VQGAN size: full (f16, 256 px), small, or auto (full for 16x16 tokens).",
                    flag_values=flag_values)
  flags.DEFINE_enum("attention", "", list(ATTENTION_CHOICES),
                    "Attention implementation (empty: config.model.attention_impl).", flag_values=flag_values)
  flags.DEFINE_enum("remat", "", list(REMAT_CHOICES),
                    "Rematerialisation policy (empty: config.model.remat).", flag_values=flag_values)
  flags.DEFINE_enum("teacher_dtype", "", ["", "float32", "bfloat16"],
                    "The frozen teacher's parameter dtype (empty: the model's param_dtype).", flag_values=flag_values)
  flags.DEFINE_bool("donate", d.donate, "Donate the state to the step.", flag_values=flag_values)
  flags.DEFINE_float("peak_tflops", d.peak_tflops, "Peak TFLOP/s per device (0: table by device kind).",
                     flag_values=flag_values)
  flags.DEFINE_bool("count_unrolled", d.count_unrolled,
                    "Count FLOPs on the lowered step with the layers unrolled.", flag_values=flag_values)
  flags.DEFINE_bool("fast_compile", d.fast_compile,
                    "Compile the step at XLA backend optimisation level 0 (CPU smoke runs only).",
                    flag_values=flag_values)
  flags.DEFINE_integer("seed", d.seed, "Seed of the random weights and draws.", flag_values=flag_values)


def options_from_flags(flag_values, argv) -> BenchmarkOptions:
  names = [f.name for f in dataclasses.fields(BenchmarkOptions) if f.name not in ("command", "config_file")]
  kwargs = {n: flag_values[n].value for n in names if n in flag_values}
  if not kwargs.get("out"):
    raise ValueError("no output directory given; pass --out=<dir>")
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  try:
    config_file = config_flags.get_config_filename(flag_values["config"])
  except Exception:  # pylint: disable=broad-except
    config_file = ""
  return BenchmarkOptions(command=" ".join(shlex.quote(a) for a in ["python", *argv]),
                          config_file=config_file or "", **kwargs)


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  if fv.config is None:
    raise ValueError("no config given; pass --config=configs/maskgit.py")
  opts = options_from_flags(fv, sys.argv)
  record = run_benchmark(fv.config, opts)
  print(json.dumps({k: record[k] for k in ("device_kind", "device_count", "date")}))
  print(markdown(record))


if __name__ == "__main__":
  from absl import app, flags as _flags  # pylint: disable=import-outside-toplevel
  define_flags(_flags.FLAGS)
  app.run(main)
