"""Sample-quality evaluation (``mode=evaluate``): the paper's Table 1 for a teacher and its
one-step Di[M]O generator.

For the teacher at every step count in ``evaluate.teacher_steps`` and the generator at one step
(at every temperature in ``evaluate.generator_temperatures``), N class-balanced samples are drawn
in batches sharded over all devices and saved in chunks under ``<workdir>/eval/samples/<set>/``
(a rerun after an interruption loads the chunks it finds and draws only the missing ones). The
samples are scored with the feature extractors that apply:

* images (``config.vqgan.checkpoint`` set): tokens -> VQGAN decode -> FID Inception-v3
  (``evaluate.inception_path``): FID against ``evaluate.reference_stats`` (``mu``/``sigma``) or
  against reference images, Inception Score (``evaluate.is_splits``) and precision / recall /
  density / coverage (``evaluate.prdc_k``) against reference features;
* grey-level token images (the data's ``image_shape``): the Frechet distance in pixel space
  (the grey-level token values as a flat vector);
* labelled token data: a classifier trained by the project (``dimo_jax.classifier``, cached in
  ``evaluate.classifier_dir``): Frechet distance on its features, its accuracy on the
  class-conditional samples and PRDC on its features.

The reference is held-out real data (``evaluate.reference_split``) or the given statistics /
images. Two real-data rows give the floors: a real set (the other split) against the same
reference, and two random halves of the whole data set against each other. Wall time per
sample is measured after compilation. The entropy-shift diagnostic counts, per position, the
tokens with probability above ``evaluate.entropy_threshold`` for the teacher (one step from all
masks) and for the generator (one step from x_init).

Outputs in ``<workdir>/eval/``: ``results.json``, ``table.md`` (``format_table``), ``grid.png``
(rows: teacher at ``evaluate.grid_steps``, then the generator) and ``entropy.png``.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax import checkpoints, metrics, models, sample, sharding

EVAL_SUBDIR = "eval"
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
GRID_FILE = "grid.png"
ENTROPY_FILE = "entropy.png"

# Column key -> (header, number format). The table shows the columns some row has.
COLUMNS = (
    ("steps", "steps", "{:d}"),
    ("fid", "FID", "{:.2f}"),
    ("fd_pixel", "FD-pixel", "{:.2f}"),
    ("fd_classifier", "FD-classifier", "{:.2f}"),
    ("accuracy", "Acc", "{:.3f}"),
    ("inception_score", "IS", "{:.2f}"),
    ("precision", "Prec", "{:.3f}"),
    ("recall", "Rec", "{:.3f}"),
    ("density", "Dens", "{:.3f}"),
    ("coverage", "Cov", "{:.3f}"),
    ("ms_per_sample", "ms/sample", "{:.3f}"),
)


# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The options of one evaluation (``config.evaluate``; see ``settings_from_config``)."""
  teacher_checkpoint: str = ""
  generator: str = ""
  teacher_steps: Tuple[int, ...] = (1, 2, 4, 8, 16)
  teacher_samplers: Tuple[str, ...] = ()  # () : config.sample.sampler only; several: rows for each
  generator_temperatures: Tuple[float, ...] = (1.0,)
  r_init: Any = 0.6
  sigma: float = 0.1
  per_class: int = 50
  num_samples: int = 0
  batch_size: int = 100
  seed: int = 0
  use_ema: bool = True
  reference_split: str = "val"
  real_rows: bool = True
  inception_path: str = ""
  reference_stats: str = ""
  reference_images: str = ""
  reference_image_size: int = 256
  classifier_dir: str = ""
  classifier: Any = None
  prdc_k: int = 3
  is_splits: int = 10
  entropy_samples: int = 256
  entropy_threshold: float = 1e-3
  timing_repeats: int = 3
  grid_steps: Tuple[int, ...] = (1, 4, 16)
  grid_columns: int = 10
  output_dir: str = ""


REFERENCE_SPLITS = ("val", "train", "all")


def _tuple(value, cast, name):
  if value is None:
    return ()
  if isinstance(value, str):
    value = [v for v in value.replace(",", " ").split() if v]
  if isinstance(value, (int, float)):
    value = [value]
  try:
    return tuple(cast(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.evaluate.{name}={value!r} must be a list of numbers, e.g. [1, 2, 4]") from e


def settings_from_config(config) -> EvalSettings:
  """Reads ``config.evaluate`` (a ConfigDict or dict; missing fields take their defaults, some
  from ``config.sample`` and ``config.teacher``). Unknown fields raise ValueError."""
  ev = config.get("evaluate", None) if hasattr(config, "get") else None
  ev = dict(ev.items()) if ev is not None and hasattr(ev, "items") else {}
  names = {f.name for f in dataclasses.fields(EvalSettings)}
  unknown = sorted(set(ev) - names)
  if unknown:
    raise ValueError(f"config.evaluate has unknown field(s) {unknown}; known fields: {sorted(names)}")
  sc = config.get("sample", None) if hasattr(config, "get") else None
  sget = (lambda k, d: sc.get(k, d)) if sc is not None else (lambda k, d: d)
  defaults = dict(r_init=sget("r_init", 0.6), sigma=float(sget("sigma", 0.1)),
                  batch_size=int(sget("batch_size", 100)), seed=int(sget("seed", 0)))
  teacher = config.get("teacher", None) if hasattr(config, "get") else None
  if teacher is not None:
    defaults["use_ema"] = bool(teacher.get("use_ema", True))
  kwargs = {**defaults, **{k: v for k, v in ev.items() if v is not None or k == "classifier"}}
  for key in ("teacher_steps", "grid_steps"):
    if key in kwargs:
      kwargs[key] = _tuple(kwargs[key], int, key)
  clf = kwargs.get("classifier")
  if clf is not None:
    if not hasattr(clf, "items"):
      raise ValueError(f"config.evaluate.classifier must be a dict of classifier settings, got {clf!r}")
    kwargs["classifier"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in clf.items()}
  if "teacher_samplers" in kwargs:
    kwargs["teacher_samplers"] = _tuple(kwargs["teacher_samplers"] or (), str, "teacher_samplers")
  if "generator_temperatures" in kwargs:
    kwargs["generator_temperatures"] = _tuple(kwargs["generator_temperatures"], float, "generator_temperatures")
  s = EvalSettings(**kwargs)
  _check_settings(s)
  return s


def _check_settings(s: EvalSettings):
  if any(t < 1 for t in s.teacher_steps):
    raise ValueError(f"config.evaluate.teacher_steps={list(s.teacher_steps)}: step counts must be >= 1")
  if any(not math.isfinite(t) or t < 0 for t in s.generator_temperatures):
    raise ValueError(f"config.evaluate.generator_temperatures={list(s.generator_temperatures)}: "
                     "temperatures must be finite and >= 0")
  checks = [("per_class", s.per_class >= 0, ">= 0"), ("num_samples", s.num_samples >= 0, ">= 0 (0: per_class x classes)"),
            ("batch_size", s.batch_size >= 1, ">= 1"), ("prdc_k", s.prdc_k >= 1, ">= 1"),
            ("is_splits", s.is_splits >= 1, ">= 1"), ("entropy_samples", s.entropy_samples >= 0, ">= 0 (0: off)"),
            ("timing_repeats", s.timing_repeats >= 0, ">= 0 (0: off)"), ("grid_columns", s.grid_columns >= 0, ">= 0"),
            ("entropy_threshold", 0.0 < s.entropy_threshold < 1.0, "in (0, 1)"),
            ("sigma", 0.0 <= s.sigma <= 1.0, "in [0, 1]"),
            ("reference_image_size", s.reference_image_size >= 1, ">= 1")]
  for name, ok, what in checks:
    if not ok:
      raise ValueError(f"config.evaluate.{name}={getattr(s, name)!r} must be {what}")
  unknown = [n for n in s.teacher_samplers if n not in sample.SAMPLERS]
  if unknown or len(set(s.teacher_samplers)) != len(s.teacher_samplers):
    raise ValueError(f"config.evaluate.teacher_samplers={list(s.teacher_samplers)}: name each of {list(sample.SAMPLERS)} "
                     "at most once (empty: config.sample.sampler only)")
  if s.reference_split not in REFERENCE_SPLITS:
    raise ValueError(f"config.evaluate.reference_split={s.reference_split!r} is not valid; choose one of "
                     f"{list(REFERENCE_SPLITS)}")
  _r_init_value(s.r_init)


def _r_init_value(spec):
  """A fixed r_init (number) or ``None`` plus the parsed function for a random range."""
  from dimo_jax import masking  # pylint: disable=import-outside-toplevel
  try:
    fn = masking.parse_r_init(float(spec) if isinstance(spec, (int, float)) else spec)
  except ValueError as e:
    raise ValueError(f"config.evaluate.r_init={spec!r} is not valid ({e}); use a number in [0, 1], "
                     "'fix_0.6' or 'random_0.4_0.8'") from e
  if isinstance(spec, (int, float)):
    return float(spec), fn
  if isinstance(spec, str) and spec.startswith("fix_"):
    return float(spec[len("fix_"):]), fn
  return None, fn


# ---------------------------------------------------------------------------- small helpers
def _save_npz(path: str, **arrays):
  import io  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  checkpoints.atomic_write_bytes(path, buf.getvalue())


def _json_default(obj):
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.floating):
    return float(obj)
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, tuple):
    return list(obj)
  return str(obj)


def _write_json(path: str, obj):
  text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
  checkpoints.atomic_write_bytes(path, (text + "\n").encode())


def _canonical(obj):
  return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _sha1(array: np.ndarray) -> str:
  array = np.ascontiguousarray(array)
  return hashlib.sha1(str(array.shape).encode() + str(array.dtype).encode() + array.tobytes()).hexdigest()


@jax.jit
def _leaf_stats(tree):
  return jax.tree_util.tree_map(
      lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))]), tree)


def params_fingerprint(params) -> str:
  """A short digest of a parameter tree (sum and sum of squares of every leaf, 6 digits)."""
  leaves = jax.tree_util.tree_leaves(params)
  stats = jax.tree_util.tree_leaves(_leaf_stats(params))
  text = ";".join("{:.6e},{:.6e}".format(*np.asarray(s, np.float64)) for s in stats)
  shapes = ";".join(str(tuple(x.shape)) for x in leaves)
  return hashlib.sha1((shapes + "|" + text).encode()).hexdigest()[:16]


def _fmt_seconds(s: float) -> str:
  s = int(round(max(s, 0.0)))
  return f"{s // 3600:d}:{(s % 3600) // 60:02d}:{s % 60:02d}"


class _Devices:
  """All devices as a 1-D batch mesh: batches padded to a multiple of the device count."""

  def __init__(self):
    self.mesh = sharding.make_mesh(data=-1, fsdp=1)
    self.count = int(np.prod(list(self.mesh.shape.values())))
    self.batch = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)

  def round_batch(self, batch: int) -> int:
    return int(math.ceil(batch / self.count) * self.count)

  def put_batch(self, x: np.ndarray):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self.batch, lambda idx: x[idx])

  def put_replicated(self, tree):
    def put(a):
      a = np.asarray(jax.device_get(a))
      return jax.make_array_from_callback(a.shape, self.replicated, lambda idx: a[idx])
    return jax.tree_util.tree_map(put, tree)


def _host(x) -> np.ndarray:
  return sample.host_array(x)


def _map_batches(fn: Callable, x: np.ndarray, batch: int, devices: _Devices):
  """``fn(device_batch)`` over ``x`` [N, ...] in padded, sharded batches; outputs concatenated
  on the host (a tuple of outputs gives a tuple of arrays)."""
  outs = None
  n = x.shape[0]
  for start in range(0, n, batch):
    chunk = x[start:start + batch]
    m = chunk.shape[0]
    if m < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - m, axis=0)])
    res = fn(devices.put_batch(chunk))
    res = res if isinstance(res, tuple) else (res,)
    res = [_host(r)[:m] for r in res]
    outs = [[r] for r in res] if outs is None else [o + [r] for o, r in zip(outs, res)]
  arrays = tuple(np.concatenate(o) for o in outs)
  return arrays if len(arrays) > 1 else arrays[0]


# ---------------------------------------------------------------------------- sample sets
@dataclasses.dataclass
class SampleSet:
  """One (model, steps, temperature) set of samples."""
  name: str  # folder name, e.g. teacher_steps16
  model: str  # teacher | generator
  steps: int
  temperature: Optional[float]
  meta: dict  # everything that determines the samples besides N
  sample_fn: Callable  # (key, labels_device) -> tokens [B, L] (device)


def _chunk_path(folder: str, index: int) -> str:
  return os.path.join(folder, f"chunk_{index:05d}.npz")


def generate_set(sset: SampleSet, labels: np.ndarray, batch: int, seed: int, folder: str,
                 devices: _Devices) -> Tuple[np.ndarray, dict]:
  """Draws (or loads) the samples of ``sset`` for ``labels``; one chunk file per batch.

  Batch i uses ``fold_in(key(seed), i)`` and is saved as ``chunk_<i>.npz`` (tokens, labels).
  A chunk is reused when it exists, holds the expected labels and the set's ``meta.json``
  matches; a changed meta removes the old chunks. Returns (tokens [N, L], counts) with
  counts = {'generated': batches drawn now, 'loaded': batches read}. Process 0 writes the files;
  multi-host runs need a shared file system for resuming.
  """
  os.makedirs(folder, exist_ok=True)
  meta_path = os.path.join(folder, "meta.json")
  meta = _canonical(dict(sset.meta, batch_size=batch, seed=seed))
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      try:
        old = json.load(f)
      except json.JSONDecodeError:
        old = None
    if old != meta:
      logging.warning("Samples in %s were drawn with other settings; drawing them again.", folder)
      if jax.process_index() == 0:
        for p in glob.glob(os.path.join(folder, "chunk_*.npz")):
          os.remove(p)
  if jax.process_index() == 0:
    _write_json(meta_path, meta)

  num = labels.shape[0]
  num_batches = int(math.ceil(num / batch))
  base = jax.random.key(int(seed))
  out, counts = [], {"generated": 0, "loaded": 0}
  started, last_log, done_now = time.time(), 0.0, 0
  for i in range(num_batches):
    lab = labels[i * batch:(i + 1) * batch]
    n = lab.shape[0]
    path = _chunk_path(folder, i)
    tokens = None
    if os.path.isfile(path):
      try:
        with np.load(path, allow_pickle=False) as z:
          if np.array_equal(z["labels"], lab):
            tokens = np.asarray(z["tokens"], np.int32)
      except (OSError, ValueError, KeyError):
        tokens = None
    if tokens is not None:
      counts["loaded"] += 1
    else:
      padded = np.concatenate([lab, np.resize(lab, batch - n)]) if n < batch else lab
      tokens = _host(sset.sample_fn(jax.random.fold_in(base, i), devices.put_batch(padded.astype(np.int32))))
      tokens = np.asarray(tokens[:n], np.int32)
      if jax.process_index() == 0:
        _save_npz(path, tokens=tokens, labels=lab)
      counts["generated"] += 1
      done_now += n
    out.append(tokens)
    now = time.time()
    if counts["generated"] and (now - last_log > 30.0 or i == num_batches - 1):
      last_log = now
      done = min((i + 1) * batch, num)
      rate = done_now / max(now - started, 1e-9)
      eta = (num - done) / rate if rate > 0 else float("nan")
      logging.info("%s: %d/%d samples (%d loaded), %.1f samples/s, ETA %s", sset.name, done, num,
                   counts["loaded"] * batch, rate, _fmt_seconds(eta) if math.isfinite(eta) else "?")
  if counts["generated"] == 0:
    logging.info("%s: all %d samples loaded from %s", sset.name, num, folder)
  return np.concatenate(out).astype(np.int32), counts


def time_sample_fn(sample_fn: Callable, labels: np.ndarray, devices: _Devices, repeats: int,
                   seed: int = 0) -> Optional[float]:
  """Median wall time per sample in milliseconds of ``sample_fn`` on one batch of ``labels``,
  after one untimed call (compilation); None when ``repeats`` is 0."""
  if repeats <= 0:
    return None
  lab = devices.put_batch(labels.astype(np.int32))
  key = jax.random.key(int(seed) + 7919)
  jax.block_until_ready(sample_fn(key, lab))
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(sample_fn(jax.random.fold_in(key, r + 1), lab))
    times.append(time.perf_counter() - start)
  return float(np.median(times) / labels.shape[0] * 1000.0)


# ---------------------------------------------------------------------------- models
def _teacher_sample_fn(model, params, steps: int, sc) -> Callable:
  """``fn(key, labels) -> tokens`` with the iterative sampler configured by ``config.sample``."""
  from dimo_jax import samplers, train  # pylint: disable=import-outside-toplevel
  get = (lambda k, d: sc.get(k, d)) if sc is not None else (lambda k, d: d)
  name = get("sampler", "confidence")
  if name not in sample.SAMPLERS:
    raise ValueError(f"config.sample.sampler={name!r} is not known; choose one of {sample.SAMPLERS}")
  if not 1 <= steps <= model.seq_len:
    raise ValueError(f"config.evaluate.teacher_steps holds {steps}; step counts must be in [1, {model.seq_len}] "
                     "(the sequence length)")
  guidance = float(get("guidance", 1.0))
  if guidance != 1.0 and (not model.has_null_class or model.num_classes == 0):
    raise ValueError(f"config.sample.guidance={guidance} needs a class-conditional model with a null class; "
                     "use --config.sample.guidance=1")
  kwargs = dict(seq_len=model.seq_len, codebook_size=model.codebook_size, steps=int(steps),
                schedule=get("schedule", "arccos"), temperature=float(get("temperature", 1.0)),
                guidance=guidance, guidance_schedule=get("guidance_schedule", "constant"),
                null_label=model.null_label if model.has_null_class else None,
                top_k=int(get("top_k", 0)), top_p=float(get("top_p", 1.0)))
  apply_fn = train.make_apply_fn(model)
  if name == "confidence":
    kwargs["r_temp"] = float(get("r_temp", 4.5))
    sampler = samplers.confidence_sampler
  else:
    sampler = samplers.ancestral_sampler
  meta = dict(sampler=name, **{k: v for k, v in kwargs.items() if k not in ("seq_len", "codebook_size")})
  return (lambda key, labels: sampler(apply_fn, params, key, labels, **kwargs)), meta


@functools.lru_cache(maxsize=16)
def _generator_program(model, r_init, sigma: float, top_k: int, top_p: float) -> Callable:
  """Jitted ``gen(params, key, labels, temperature) -> tokens`` (cached, so reruns reuse it)."""
  from dimo_jax import distill  # pylint: disable=import-outside-toplevel
  fixed, r_fn = _r_init_value(r_init)

  @jax.jit
  def gen(params, key, labels, temp):
    if fixed is None:
      k_r, key = jax.random.split(key)
      r = r_fn(k_r)
    else:
      r = fixed
    return distill.one_step_generate(model, params, key, labels, r_init=r, sigma=sigma,
                                     temperature=temp, top_k=top_k, top_p=top_p)
  return gen


def _generator_sample_fn(model, params, s: EvalSettings, sc, temperature: float) -> Tuple[Callable, dict]:
  """``fn(key, labels) -> tokens``: one-step samples (``distill.one_step_generate``)."""
  get = (lambda k, d: sc.get(k, d)) if sc is not None else (lambda k, d: d)
  top_k, top_p = int(get("top_k", 0)), float(get("top_p", 1.0))
  gen = _generator_program(model, s.r_init, float(s.sigma), top_k, top_p)
  temp = jnp.float32(temperature)
  meta = dict(r_init=s.r_init, sigma=s.sigma, temperature=float(temperature), top_k=top_k, top_p=top_p)
  return (lambda key, labels: gen(params, key, labels, temp)), meta


def _resolve_teacher_path(config, s: EvalSettings, workdir: str) -> str:
  if s.teacher_checkpoint:
    return s.teacher_checkpoint
  teacher = config.get("teacher", None) if hasattr(config, "get") else None
  path = teacher.get("checkpoint", "") if teacher is not None else ""
  if path:
    return path
  stored = checkpoints.read_config(workdir) or {}
  path = (stored.get("teacher") or {}).get("checkpoint", "")
  if path:
    return path
  raise ValueError("no teacher to evaluate: set --config.teacher.checkpoint=<teacher workdir> (or "
                   "--config.evaluate.teacher_checkpoint), or --config.evaluate.teacher_steps='' to "
                   "evaluate the generator only")


def _load_models(config, s: EvalSettings, workdir: str):
  """(teacher (model, params, path) or None, generator (model, params, path) or None)."""
  from dimo_jax import distill  # pylint: disable=import-outside-toplevel
  overrides = None
  model_cfg = config.get("model", None) if hasattr(config, "get") else None
  if model_cfg is not None:
    overrides = models.compute_overrides(model_cfg)
  teacher = generator = None
  need_teacher = bool(s.teacher_steps) or s.entropy_samples > 0
  if need_teacher:
    try:
      path = _resolve_teacher_path(config, s, workdir)
    except ValueError:
      if s.teacher_steps:
        raise
      path = None
    if path:
      model, params, _ = sample.load_teacher(path, use_ema=s.use_ema, overrides=overrides)
      teacher = (model, params, os.path.abspath(path))
  gen_path = s.generator or workdir
  if s.generator or os.path.isdir(distill.generator_dir(gen_path)):
    model, params, _ = distill.load_generator(gen_path, overrides=overrides)
    generator = (model, params, os.path.abspath(gen_path))
  elif s.generator_temperatures:
    logging.info("No generator in %s (no %s folder): evaluating the teacher only.", gen_path,
                 distill.GENERATOR_SUBDIR)
  if teacher is None and generator is None:
    raise ValueError(f"nothing to evaluate: no teacher (config.evaluate.teacher_steps is empty) and no generator "
                     f"in {gen_path!r}; pass --workdir=<distillation workdir> or --config.evaluate.generator")
  if teacher is not None and generator is not None:
    a, b = teacher[0], generator[0]
    if (a.codebook_size, a.seq_len, a.num_classes) != (b.codebook_size, b.seq_len, b.num_classes):
      raise ValueError(f"teacher {teacher[2]!r} (K={a.codebook_size}, L={a.seq_len}, C={a.num_classes}) and "
                       f"generator {generator[2]!r} (K={b.codebook_size}, L={b.seq_len}, C={b.num_classes}) "
                       "differ in sizes; evaluate a generator distilled from this teacher")
  return teacher, generator


# ---------------------------------------------------------------------------- features
@dataclasses.dataclass
class Extractors:
  """The feature extractors of one evaluation (None where not applicable)."""
  pixel: Optional[Callable] = None  # tokens -> [N, L] float64 grey values
  classifier: Optional[Callable] = None  # tokens -> (features, logits)
  classifier_meta: Optional[dict] = None
  inception: Optional[Callable] = None  # tokens -> (pool, logits)
  inception_images: Optional[Callable] = None  # images [N, H, W, 3] -> (pool, logits)
  decode: Optional[Callable] = None  # tokens -> images [N, H, W, 3] in [0, 1]
  inception_id: str = ""


def _load_dataset(config, model):
  """The config's data set (None for data-free configs); sizes checked against the model."""
  from dimo_jax import data  # pylint: disable=import-outside-toplevel
  dcfg = config.get("data", None) if hasattr(config, "get") else None
  if dcfg is None or dcfg.get("name", "none") in ("none", "", None):
    return None
  ds = data.load_dataset(dcfg)
  if ds.seq_len != model.seq_len or ds.vocab_size > model.codebook_size:
    raise ValueError(f"config.data ({ds.name}: vocab_size={ds.vocab_size}, seq_len={ds.seq_len}) does not match "
                     f"the model (codebook_size={model.codebook_size}, seq_len={model.seq_len}); pass the data "
                     "settings the teacher was trained with")
  return ds


def _build_extractors(config, s: EvalSettings, ds, model, out_dir: str, devices: _Devices) -> Extractors:
  ex = Extractors()
  vq = config.get("vqgan", None) if hasattr(config, "get") else None
  vq_path = vq.get("checkpoint", "") if vq is not None else ""
  batch = devices.round_batch(s.batch_size)
  if vq_path:
    if not s.inception_path:
      raise ValueError("config.vqgan.checkpoint is set (image tokens) but config.evaluate.inception_path is empty; "
                       "pass the FID Inception weights, e.g. --config.evaluate.inception_path="
                       "pt_inception-2015-12-05-6726825d.pth")
    from dimo_jax import convert, inception  # pylint: disable=import-outside-toplevel
    vq_module, vq_vars = convert.load_vqgan(vq_path)
    inc_apply, inc_vars = inception.load_fid_inception(s.inception_path)
    vq_vars = devices.put_replicated(vq_vars)
    inc_vars = devices.put_replicated(inc_vars)
    decode = jax.jit(lambda v, t: vq_module.apply(v, t, method="decode_tokens"))
    both = jax.jit(lambda v, w, t: inc_apply(w, decode(v, t)))
    ex.decode = lambda tokens: _map_batches(lambda t: decode(vq_vars, t), np.asarray(tokens, np.int32), batch,
                                            devices)
    ex.inception = lambda tokens: _map_batches(lambda t: both(vq_vars, inc_vars, t), np.asarray(tokens, np.int32),
                                               batch, devices)
    ex.inception_images = lambda images: _map_batches(lambda x: inc_apply(inc_vars, x),
                                                      np.asarray(images, np.float32), batch, devices)
    ex.inception_id = f"{os.path.abspath(s.inception_path)}|{os.path.abspath(vq_path)}"
    return ex
  if ds is None:
    raise ValueError("no feature extractor applies: the data set is config.data.name='none' and no VQGAN is set; "
                     "set config.vqgan.checkpoint and config.evaluate.inception_path (image tokens) or a data set")
  if ds.image_shape is not None:
    ex.pixel = lambda tokens: np.clip(np.asarray(tokens, np.float64), 0, ds.vocab_size - 1).reshape(len(tokens), -1)
  if ds.train_labels is not None and ds.num_classes >= 2:
    from dimo_jax import classifier  # pylint: disable=import-outside-toplevel
    folder = s.classifier_dir or os.path.join(out_dir, "classifier")
    settings = classifier.settings_from_config(s.classifier)
    apply_fn, params, meta = classifier.load_or_train_classifier(ds, folder, settings=settings)
    ex.classifier = lambda tokens: classifier.predict(apply_fn, params, np.asarray(tokens, np.int32))
    ex.classifier_meta = {"folder": os.path.abspath(folder), "val_accuracy": meta.get("val_accuracy"),
                          "train_accuracy": meta.get("train_accuracy"), "cached": meta.get("cached")}
  if ex.pixel is None and ex.classifier is None:
    raise ValueError(f"no feature extractor applies to data set {ds.name!r}: it has neither an image_shape "
                     "(pixel space) nor class labels (classifier); set config.data.image_shape or give labels")
  return ex


@dataclasses.dataclass
class Features:
  pixel: Optional[np.ndarray] = None
  clf_feats: Optional[np.ndarray] = None
  clf_logits: Optional[np.ndarray] = None
  inc_pool: Optional[np.ndarray] = None
  inc_logits: Optional[np.ndarray] = None


def _inception_cached(ex: Extractors, tokens: np.ndarray, cache_path: Optional[str]):
  key = _sha1(tokens) + "|" + ex.inception_id
  if cache_path and os.path.isfile(cache_path):
    try:
      with np.load(cache_path, allow_pickle=False) as z:
        if str(z["key"]) == key:
          return np.asarray(z["pool"]), np.asarray(z["logits"])
    except (OSError, ValueError, KeyError):
      pass
  pool, logits = ex.inception(tokens)
  if cache_path and jax.process_index() == 0:
    _save_npz(cache_path, pool=pool, logits=logits, key=np.asarray(key))
  return pool, logits


def compute_features(ex: Extractors, tokens: np.ndarray, cache_path: Optional[str] = None) -> Features:
  f = Features()
  if ex.pixel is not None:
    f.pixel = ex.pixel(tokens)
  if ex.classifier is not None:
    f.clf_feats, f.clf_logits = ex.classifier(tokens)
  if ex.inception is not None:
    f.inc_pool, f.inc_logits = _inception_cached(ex, tokens, cache_path)
  return f


@dataclasses.dataclass
class Reference:
  """Reference features (and Inception statistics) the rows are compared with."""
  name: str
  features: Features
  inc_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None
  num: int = 0


def _load_reference_images(path: str, size: int) -> np.ndarray:
  """Images [N, size, size, 3] float32 in [0, 1] from an .npz (``images`` or ``arr_0``, uint8 or
  float) or a folder of PNG / JPEG files."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.evaluate.reference_images={path!r} does not exist; give an .npz of images "
                            "(key 'images' or 'arr_0', [N, H, W, 3]) or a folder of PNG/JPEG files")
  from PIL import Image  # pylint: disable=import-outside-toplevel

  def fit(img: np.ndarray) -> np.ndarray:
    if img.shape[:2] != (size, size):
      img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return img

  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    if not names:
      raise ValueError(f"config.evaluate.reference_images={path!r} holds no .png/.jpg/.jpeg files")
    imgs = [fit(np.asarray(Image.open(os.path.join(path, n)).convert("RGB"))) for n in names]
    return np.stack(imgs).astype(np.float32) / 255.0
  with np.load(path, allow_pickle=False) as z:
    key = "images" if "images" in z.files else ("arr_0" if "arr_0" in z.files else None)
    if key is None:
      raise ValueError(f"{path}: expected an array 'images' or 'arr_0' [N, H, W, 3]; found keys {sorted(z.files)}")
    arr = np.asarray(z[key])
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise ValueError(f"{path}: images must be [N, H, W, 3], got shape {arr.shape}")
  if arr.dtype == np.uint8:
    arr = np.stack([fit(a) for a in arr]) if arr.shape[1:3] != (size, size) else arr
    return arr.astype(np.float32) / 255.0
  arr = np.clip(arr.astype(np.float32), 0.0, 1.0)
  if arr.shape[1:3] != (size, size):
    arr = np.stack([fit((a * 255).round().astype(np.uint8)) for a in arr]).astype(np.float32) / 255.0
  return arr


def _reference_tokens(ds, split: str):
  if split == "val":
    if ds.val_tokens.shape[0] == 0:
      raise ValueError(f"config.evaluate.reference_split='val' but data set {ds.name!r} has no validation split; "
                       "set config.data.val_fraction > 0 or config.evaluate.reference_split='train'")
    return ds.val_tokens, ds.val_labels
  if split == "train":
    return ds.train_tokens, ds.train_labels
  tokens = np.concatenate([ds.train_tokens, ds.val_tokens])
  labels = None if ds.train_labels is None else np.concatenate([ds.train_labels, ds.val_labels])
  return tokens, labels


def _build_reference(s: EvalSettings, ds, ex: Extractors, out_dir: str) -> Reference:
  if ex.inception is not None and (s.reference_stats or s.reference_images):
    stats = metrics.load_reference_stats(s.reference_stats) if s.reference_stats else None
    feats, name, num = Features(), os.path.abspath(s.reference_stats or s.reference_images), 0
    if s.reference_images:
      cache = os.path.join(out_dir, "reference_inception.npz")
      st = os.stat(s.reference_images)
      key = f"{os.path.abspath(s.reference_images)}|{st.st_mtime_ns}|{st.st_size}|{s.reference_image_size}|" \
            f"{ex.inception_id}"
      loaded = None
      if os.path.isfile(cache):
        try:
          with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
              loaded = (np.asarray(z["pool"]), np.asarray(z["logits"]))
        except (OSError, ValueError, KeyError):
          loaded = None
      if loaded is None:
        images = _load_reference_images(s.reference_images, s.reference_image_size)
        loaded = ex.inception_images(images)
        if jax.process_index() == 0:
          _save_npz(cache, pool=loaded[0], logits=loaded[1], key=np.asarray(key))
      feats.inc_pool, feats.inc_logits = loaded
      num = feats.inc_pool.shape[0]
      name = os.path.abspath(s.reference_images)
    if stats is None:
      stats = metrics.feature_stats(feats.inc_pool)
    else:
      num = num or 0
    return Reference(name=name, features=feats, inc_stats=stats, num=num)
  if ds is None:
    raise ValueError("no reference: set config.evaluate.reference_stats (an .npz with mu and sigma, e.g. "
                     "fid_stats_imagenet256_guided_diffusion.npz) or config.evaluate.reference_images, or use a "
                     "config with a data set")
  tokens, _ = _reference_tokens(ds, s.reference_split)
  feats = compute_features(ex, tokens, os.path.join(out_dir, f"reference_{s.reference_split}_inception.npz"))
  stats = metrics.feature_stats(feats.inc_pool) if feats.inc_pool is not None else None
  return Reference(name=f"{ds.name} {s.reference_split} split", features=feats, inc_stats=stats,
                   num=int(tokens.shape[0]))


# ---------------------------------------------------------------------------- metrics
def _fd(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[float]:
  if a is None or b is None or a.shape[0] < 2 or b.shape[0] < 2:
    return None
  return metrics.fid_from_features(a, b)


def score(features: Features, labels: Optional[np.ndarray], ref: Reference, s: EvalSettings) -> dict:
  """Every metric that applies to ``features`` against the reference ``ref``."""
  out: Dict[str, Any] = {}
  rf = ref.features
  if features.pixel is not None:
    out["fd_pixel"] = _fd(features.pixel, rf.pixel)
  if features.clf_feats is not None:
    out["fd_classifier"] = _fd(features.clf_feats, rf.clf_feats)
    if labels is not None:
      out["accuracy"] = float(np.mean(np.argmax(features.clf_logits, -1) == labels))
    if features.clf_logits.shape[0] >= s.is_splits:
      out["classifier_score"] = metrics.inception_score(features.clf_logits, splits=s.is_splits)[0]
  if features.inc_pool is not None:
    if ref.inc_stats is not None:
      mu, sigma = metrics.feature_stats(features.inc_pool)
      out["fid"] = metrics.frechet_distance(mu, sigma, *ref.inc_stats)
    if features.inc_logits.shape[0] >= s.is_splits:
      out["inception_score"], out["inception_score_std"] = metrics.inception_score(features.inc_logits,
                                                                                   splits=s.is_splits)
  # PRDC on the strongest features both sides have: Inception, else the classifier, else pixels.
  for name, a, b in (("inception", features.inc_pool, rf.inc_pool), ("classifier", features.clf_feats, rf.clf_feats),
                     ("pixel", features.pixel, rf.pixel)):
    if a is not None and b is not None:
      if a.shape[0] > s.prdc_k and b.shape[0] > s.prdc_k:
        out.update(metrics.prdc(b, a, k=s.prdc_k))
        out["prdc_features"] = name
      break
  return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------- entropy shift
def _token_counts(logits, threshold: float, codebook: int):
  """Per position, the number of codes with probability > threshold (softmax over K codes)."""
  p = jax.nn.softmax(logits[..., :codebook].astype(jnp.float32), axis=-1)
  return jnp.sum(p > threshold, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _teacher_count_program(model, guidance: float, threshold: float) -> Callable:
  from dimo_jax import samplers, train  # pylint: disable=import-outside-toplevel
  apply_fn = train.make_apply_fn(model)
  null = model.null_label if model.has_null_class else None

  @jax.jit
  def counts(params, labels):
    tokens = jnp.full((labels.shape[0], model.seq_len), model.codebook_size, jnp.int32)
    logits = samplers.guided_logits(apply_fn, params, tokens, labels, guidance, null)
    return _token_counts(logits, threshold, model.codebook_size)
  return counts


@functools.lru_cache(maxsize=16)
def _generator_count_program(model, r_init, sigma: float, threshold: float) -> Callable:
  from dimo_jax import masking  # pylint: disable=import-outside-toplevel
  fixed, r_fn = _r_init_value(r_init)

  @jax.jit
  def counts(params, key, labels):
    k_r, k_x, k_n = jax.random.split(key, 3)
    r = r_fn(k_r) if fixed is None else fixed
    x_init = masking.make_x_init(k_x, labels.shape[0], model.seq_len, model.codebook_size, r)
    logits = model.apply({"params": params}, x_init, labels, deterministic=True, noise_sigma=sigma,
                         rngs={"noise": k_n})
    return _token_counts(logits, threshold, model.codebook_size)
  return counts


def entropy_shift(teacher, generator, s: EvalSettings, sc, devices: _Devices) -> dict:
  """Histograms of the per-position number of tokens with probability > threshold: the teacher
  one step from all masks (guided as in ``config.sample``), the generator one step from x_init
  (embedding noise sigma), both at temperature 1, over ``entropy_samples`` class-balanced samples.
  Each histogram equals ``metrics.entropy_shift_histogram`` of the per-position distributions."""
  out = {"threshold": s.entropy_threshold, "num_samples": s.entropy_samples}
  model = (teacher or generator)[0]
  k = model.codebook_size
  labels_all = sample.balanced_labels(s.entropy_samples, model.num_classes)
  batch = devices.round_batch(min(s.batch_size, s.entropy_samples))
  base = jax.random.key(int(s.seed) + 104729)
  get = (lambda key_, d: sc.get(key_, d)) if sc is not None else (lambda key_, d: d)

  def hist(fn):
    counts = _map_batches(fn, labels_all, batch, devices)
    return np.bincount(np.asarray(counts).reshape(-1), minlength=k + 1).astype(np.int64)

  if teacher is not None:
    t_model, t_params = teacher[0], teacher[1]
    guidance = float(get("guidance", 1.0))
    if not t_model.has_null_class or t_model.num_classes == 0:
      guidance = 1.0
    t_prog = _teacher_count_program(t_model, guidance, float(s.entropy_threshold))
    out["teacher"] = _hist_summary(hist(lambda labels: t_prog(t_params, labels)))
  if generator is not None:
    g_model, g_params = generator[0], generator[1]
    g_prog = _generator_count_program(g_model, s.r_init, float(s.sigma), float(s.entropy_threshold))
    step = [0]

    def g_counts(labels):
      key = jax.random.fold_in(base, step[0])
      step[0] += 1
      return g_prog(g_params, key, labels)
    out["generator"] = _hist_summary(hist(g_counts))
  return out


def _hist_summary(h: np.ndarray) -> dict:
  total = int(h.sum())
  values = np.arange(h.shape[0])
  mean = float((h * values).sum() / max(total, 1))
  cdf = np.cumsum(h)
  median = int(np.searchsorted(cdf, (total + 1) / 2)) if total else 0
  return {"histogram": h.tolist(), "mean": mean, "median": median, "positions": total}


def _hist_bins(vocab: int) -> List[Tuple[int, int]]:
  """Bins of the token count: every value up to 32 tokens, else powers of two."""
  if vocab <= 32:
    return [(c, c) for c in range(0, vocab + 1)]
  bins, lo = [(0, 0), (1, 1)], 2
  while lo <= vocab:
    hi = min(2 * lo - 1, vocab)
    bins.append((lo, hi))
    lo = hi + 1
  return bins


def format_entropy(ent: dict) -> str:
  """Markdown table of the entropy-shift histograms (fraction of positions per token count)."""
  names = [n for n in ("teacher", "generator") if n in ent]
  if not names:
    return ""
  vocab = len(ent[names[0]]["histogram"]) - 1
  lines = [f"Tokens with probability > {ent['threshold']:g} per position ({ent['num_samples']} samples; "
           "teacher: one step from all masks, generator: one step from x_init)", "",
           "| tokens | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for lo, hi in _hist_bins(vocab):
    fracs = []
    for n in names:
      h = np.asarray(ent[n]["histogram"])
      fracs.append(h[lo:hi + 1].sum() / max(h.sum(), 1))
    if all(f == 0 for f in fracs):
      continue
    label = f"{lo}" if lo == hi else f"{lo}-{hi}"
    lines.append(f"| {label} | " + " | ".join(f"{f:.3f}" for f in fracs) + " |")
  lines.append("| mean | " + " | ".join(f"{ent[n]['mean']:.2f}" for n in names) + " |")
  lines.append("| median | " + " | ".join(f"{ent[n]['median']:d}" for n in names) + " |")
  return "\n".join(lines)


def save_entropy_png(ent: dict, path: str):
  """Bar chart (teacher blue, generator orange) of the entropy-shift histograms."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  names = [n for n in ("teacher", "generator") if n in ent]
  if not names:
    return
  vocab = len(ent[names[0]]["histogram"]) - 1
  bins = _hist_bins(vocab)
  fracs = {n: [np.asarray(ent[n]["histogram"])[lo:hi + 1].sum() / max(sum(ent[n]["histogram"]), 1)
               for lo, hi in bins] for n in names}
  colors = {"teacher": (31, 119, 180), "generator": (255, 127, 14)}
  bar, gap, height, margin = 10, 8, 200, 30
  width = margin * 2 + len(bins) * (bar * len(names) + gap)
  img = Image.new("RGB", (max(width, 260), height + 2 * margin + 15), "white")
  draw = ImageDraw.Draw(img)
  top = max(max(v) for v in fracs.values()) or 1.0
  for b, (lo, hi) in enumerate(bins):
    x0 = margin + b * (bar * len(names) + gap)
    for j, n in enumerate(names):
      h = int(round(fracs[n][b] / top * height))
      x = x0 + j * bar
      draw.rectangle([x, margin + height - h, x + bar - 1, margin + height], fill=colors[n])
    if len(bins) <= 20 or b % 2 == 0:
      draw.text((x0, margin + height + 3), f"{lo}" if lo == hi else f"{lo}", fill="black")
  draw.text((margin, 5), "tokens with p > {:g}: ".format(ent["threshold"]) + ", ".join(
      f"{n} ({'blue' if n == 'teacher' else 'orange'})" for n in names), fill="black")
  buf = __import__("io").BytesIO()
  img.save(buf, format="PNG")
  checkpoints.atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------- table
def _row_label(row: dict) -> str:
  return row.get("label") or row.get("name", "")


def format_table(results: dict) -> str:
  """The paper's Table 1 layout (markdown): one row per model / step count, the metric columns
  that some row has."""
  rows = results.get("rows", [])
  cols = [(k, h, f) for k, h, f in COLUMNS if any(r.get(k) is not None for r in rows)]
  title = results.get("title", "Model")
  lines = ["| " + " | ".join([title] + [h for _, h, _ in cols]) + " |",
           "|---|" + "---|" * len(cols)]
  for r in rows:
    cells = [_row_label(r)]
    for k, _, f in cols:
      v = r.get(k)
      if v is None:
        cells.append("-")
      elif k == "steps":
        cells.append(f.format(int(v)))
      else:
        cells.append(f.format(float(v)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def ratio_to_teacher_best(results: dict) -> Optional[dict]:
  """Each generator row's distance over the teacher's best (lowest) over all its rows (every step
  count and sampler): FID when the rows have it, else FD-pixel. None without both kinds of rows."""
  rows = results.get("rows", [])
  metric = next((k for k in ("fid", "fd_pixel") if any(r.get(k) is not None for r in rows)), None)
  teachers = [r for r in rows if r.get("model") == "teacher" and r.get(metric) is not None]
  generators = [r for r in rows if r.get("model") == "generator" and r.get(metric) is not None]
  if metric is None or not teachers or not generators:
    return None
  best = min(teachers, key=lambda r: r[metric])
  return {"metric": metric, "teacher_best": float(best[metric]), "teacher_best_row": best.get("name"),
          "teacher_best_label": f"{_row_label(best)}, {best.get('steps')} steps",
          "generators": {r.get("name"): float(r[metric]) / max(float(best[metric]), 1e-12) for r in generators}}


def ratio_note(results: dict) -> str:
  """One sentence: the generator's distance as a multiple of the teacher's best ("" if no ratio)."""
  ratio = ratio_to_teacher_best(results)
  if not ratio:
    return ""
  name = {"fid": "FID", "fd_pixel": "FD-pixel"}[ratio["metric"]]
  gens = ", ".join(f"{r:.2f}x" for r in ratio["generators"].values())
  return f"Di[M]O {name} over the teacher's best ({ratio['teacher_best']:.2f}: {ratio['teacher_best_label']}): {gens}."


def _notes(results: dict) -> str:
  note = ratio_note(results)
  lines = [note] if note else []
  ref = results.get("reference", {})
  if ref:
    lines.append(f"Reference: {ref.get('name')} ({ref.get('num')} samples). Samples per row: "
                 f"{results.get('num_samples')}.")
  clf = results.get("classifier")
  if clf:
    lines.append(f"Classifier: validation accuracy {clf.get('val_accuracy'):.4f}"
                 if clf.get("val_accuracy") is not None else "Classifier: no validation split")
  rows = results.get("rows", [])
  prdc = sorted({r.get("prdc_features") for r in rows if r.get("prdc_features")})
  if prdc:
    lines.append(f"Precision / recall / density / coverage (k={results.get('settings', {}).get('prdc_k', 3)}) on "
                 f"{', '.join(prdc)} features. FD-pixel: Frechet distance of the grey-level token values.")
  return "\n".join(lines)


def _markdown(results: dict) -> str:
  parts = ["# Evaluation", "", format_table(results), "", _notes(results)]
  ent = results.get("entropy_shift")
  if ent and ("teacher" in ent or "generator" in ent):
    parts += ["", "## Entropy shift", "", format_entropy(ent)]
  return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- grid
def _grid(results_sets: Dict[str, np.ndarray], order: Sequence[str], s: EvalSettings, ex: Extractors, ds,
          vocab: int, path: str) -> Optional[str]:
  from dimo_jax import data  # pylint: disable=import-outside-toplevel
  names = [n for n in order if n in results_sets]
  if not names or s.grid_columns == 0:
    return None
  cols = min(s.grid_columns, min(results_sets[n].shape[0] for n in names))
  tokens = np.concatenate([results_sets[n][:cols] for n in names])
  if ex.decode is not None:
    images = ex.decode(tokens)
  elif ds is not None and ds.image_shape is not None:
    images = data.tokens_to_images(tokens, vocab, ds.image_shape)
  else:
    return None
  scale = 4 if images.shape[1] <= 64 else 1
  data.save_image_grid(images, path, ncols=cols, scale=scale)
  return path


# ---------------------------------------------------------------------------- main
def _num_samples(s: EvalSettings, num_classes: int) -> int:
  if s.num_samples > 0:
    return int(s.num_samples)
  if num_classes > 0 and s.per_class > 0:
    return int(s.per_class * num_classes)
  raise ValueError("config.evaluate.num_samples is 0 and the model is unconditional (or per_class is 0); set "
                   "--config.evaluate.num_samples=N")


def run_evaluate(config, workdir: str) -> dict:
  """``mode=evaluate``: samples, metrics and the Table 1 files in ``<workdir>/eval`` (see the
  module docstring). Returns the results dict (also written to ``results.json``)."""
  if not workdir:
    raise ValueError("no workdir given; pass --workdir=<distillation workdir>")
  s = settings_from_config(config)
  sc = config.get("sample", None) if hasattr(config, "get") else None
  out_dir = s.output_dir or os.path.join(os.fspath(workdir), EVAL_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  start = time.time()
  devices = _Devices()

  teacher, generator = _load_models(config, s, workdir)
  model = (teacher or generator)[0]
  if teacher is not None:
    teacher = (teacher[0], devices.put_replicated(teacher[1]), teacher[2])
  if generator is not None:
    generator = (generator[0], devices.put_replicated(generator[1]), generator[2])
  num = _num_samples(s, model.num_classes)
  labels = sample.balanced_labels(num, model.num_classes)
  batch = devices.round_batch(s.batch_size)
  conditional = model.num_classes > 0

  # The sample sets (their settings are checked before any feature extractor is built).
  sets: List[SampleSet] = []
  if teacher is not None:
    fp = params_fingerprint(teacher[1])
    default_sampler = sc.get("sampler", "confidence") if sc is not None else "confidence"
    teacher_samplers = s.teacher_samplers or (default_sampler,)
    for i, name in enumerate(teacher_samplers):
      # The first sampler's sets keep the plain names (the grid and the sample mode use them).
      sc_i = dict(sc.items() if sc is not None else (), sampler=name)
      prefix = "teacher_" if i == 0 else f"teacher_{name}_"
      for steps in s.teacher_steps:
        fn, meta = _teacher_sample_fn(teacher[0], teacher[1], steps, sc_i)
        sets.append(SampleSet(f"{prefix}steps{steps}", "teacher", int(steps), None,
                              dict(meta, model="teacher", checkpoint=teacher[2], params=fp), fn))
  if generator is not None:
    fp = params_fingerprint(generator[1])
    for temp in s.generator_temperatures:
      fn, meta = _generator_sample_fn(generator[0], generator[1], s, sc, temp)
      sets.append(SampleSet(f"generator_temp{temp:g}", "generator", 1, float(temp),
                            dict(meta, model="generator", checkpoint=generator[2], params=fp), fn))

  ds = _load_dataset(config, model)
  ex = _build_extractors(config, s, ds, model, out_dir, devices)
  ref = _build_reference(s, ds, ex, out_dir)
  logging.info("Evaluating %d samples per row against %s (%d samples), batch %d on %d device(s).", num, ref.name,
               ref.num, batch, devices.count)

  rows, tokens_by_set, counts = [], {}, {}
  multi_temp = len(s.generator_temperatures) > 1
  for sset in sets:
    folder = os.path.join(out_dir, "samples", sset.name)
    tokens, c = generate_set(sset, labels, batch, s.seed, folder, devices)
    tokens_by_set[sset.name], counts[sset.name] = tokens, c
    ms = time_sample_fn(sset.sample_fn, labels[:batch] if num >= batch else np.resize(labels, batch), devices,
                        s.timing_repeats, s.seed)
    feats = compute_features(ex, tokens, os.path.join(folder, "inception.npz"))
    row = dict(name=sset.name, model=sset.model, steps=sset.steps, temperature=sset.temperature,
               num_samples=int(tokens.shape[0]), ms_per_sample=ms)
    if sset.model == "teacher":
      row["sampler"] = sset.meta["sampler"]
      row["label"] = "Teacher" + (f" ({sset.meta['sampler']})" if len(s.teacher_samplers) > 1 else "")
    else:
      row["label"] = "Di[M]O" + (f" (T={sset.temperature:g})" if multi_temp else "")
    row.update(score(feats, labels if conditional else None, ref, s))
    rows.append(row)
    logging.info("%s: %s", sset.name, {k: v for k, v in row.items() if isinstance(v, float)})

  # Real-data floors.
  floors = {}
  if ds is not None and s.real_rows:
    rng = np.random.default_rng(int(s.seed))
    if s.reference_split in ("val", "train"):
      other = "train" if s.reference_split == "val" else "val"
      r_tokens, r_labels = _reference_tokens(ds, other) if (other == "train" or ds.val_tokens.shape[0]) else (None, None)
      if r_tokens is not None and r_tokens.shape[0] > s.prdc_k:
        idx = np.sort(rng.permutation(r_tokens.shape[0])[:num])
        feats = compute_features(ex, r_tokens[idx], os.path.join(out_dir, f"real_{other}_inception.npz"))
        row = dict(name=f"real_{other}", model="real", label=f"Real data ({other} split)", steps=None,
                   num_samples=int(idx.shape[0]), ms_per_sample=None)
        row.update(score(feats, None if r_labels is None else r_labels[idx], ref, s))
        rows.append(row)
    all_tokens, all_labels = _reference_tokens(ds, "all")
    perm = rng.permutation(all_tokens.shape[0])
    half = all_tokens.shape[0] // 2
    a_idx, b_idx = np.sort(perm[:half]), np.sort(perm[half:2 * half])
    if half > s.prdc_k:
      fa = compute_features(ex, all_tokens[a_idx], os.path.join(out_dir, "real_half_a_inception.npz"))
      fb = compute_features(ex, all_tokens[b_idx], os.path.join(out_dir, "real_half_b_inception.npz"))
      half_ref = Reference(name="half B", features=fb,
                           inc_stats=metrics.feature_stats(fb.inc_pool) if fb.inc_pool is not None else None,
                           num=int(half))
      row = dict(name="real_halves", model="real", label="Real data (two halves)", steps=None,
                 num_samples=int(half), ms_per_sample=None)
      row.update(score(fa, None if all_labels is None else all_labels[a_idx], half_ref, s))
      rows.append(row)
      floors = {k: row[k] for k in ("fd_pixel", "fd_classifier", "fid") if k in row}

  results = {
      "title": "Model",
      "num_samples": num,
      "num_devices": devices.count,
      "batch_size": batch,
      "reference": {"name": ref.name, "num": ref.num},
      "floor_two_halves": floors,
      "rows": rows,
      "generation": counts,
      "settings": _canonical(dataclasses.asdict(s)),
      "teacher": teacher[2] if teacher is not None else None,
      "generator": generator[2] if generator is not None else None,
  }
  if ex.classifier_meta is not None:
    results["classifier"] = ex.classifier_meta
  results["ratio_to_teacher_best"] = ratio_to_teacher_best(results)

  if s.entropy_samples > 0:
    results["entropy_shift"] = entropy_shift(teacher, generator, s, sc, devices)

  files = {}
  if jax.process_index() == 0:
    grid_order = [f"teacher_steps{t}" for t in s.grid_steps] + [x.name for x in sets if x.model == "generator"]
    grid = _grid(tokens_by_set, grid_order, s, ex, ds, model.codebook_size, os.path.join(out_dir, GRID_FILE))
    if grid:
      files["grid"] = grid
    if "entropy_shift" in results and any(k in results["entropy_shift"] for k in ("teacher", "generator")):
      save_entropy_png(results["entropy_shift"], os.path.join(out_dir, ENTROPY_FILE))
      files["entropy"] = os.path.join(out_dir, ENTROPY_FILE)
    files["table"] = os.path.join(out_dir, TABLE_FILE)
    files["results"] = os.path.join(out_dir, RESULTS_FILE)
    results["files"] = files
    results["seconds"] = round(time.time() - start, 3)
    with open(files["table"] + ".tmp", "w") as f:
      f.write(_markdown(results))
    os.replace(files["table"] + ".tmp", files["table"])
    _write_json(files["results"], results)
  else:
    results["seconds"] = round(time.time() - start, 3)
  logging.info("Evaluation (%.1f s):\n%s\n%s", results["seconds"], format_table(results), ratio_note(results))
  return results


__all__ = [
    "EvalSettings", "settings_from_config", "generate_set", "time_sample_fn", "params_fingerprint",
    "compute_features", "score", "entropy_shift", "format_table", "format_entropy", "run_evaluate",
    "ratio_to_teacher_best", "ratio_note",
]
