"""Sample sets for evaluation: drawn in device batches, saved in chunks and resumed, with the
teacher's iterative and the generator's one-step sampling programs, and their timing.
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
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core import generator_steps as gen_steps
from dimo_jax.core import samplers, sharding
from dimo_jax.core.sharding import host_array
from dimo_jax.evaluation.settings import EvalSettings, SamplerSettings, r_init_value, sampler_settings_from_config
from dimo_jax.networks import conditioning
from dimo_jax.storage import checkpoints


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


def write_json(path: str, obj):
  text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
  checkpoints.atomic_write_bytes(path, (text + "\n").encode())


def canonical(obj):
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


def fmt_seconds(s: float) -> str:
  s = int(round(max(s, 0.0)))
  return f"{s // 3600:d}:{(s % 3600) // 60:02d}:{s % 60:02d}"


class Devices:
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


def map_batches(fn: Callable, x: np.ndarray, batch: int, devices: Devices):
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
    res = [host_array(r)[:m] for r in res]
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
                 devices: Devices) -> Tuple[np.ndarray, dict]:
  """Draws (or loads) the samples of ``sset`` for ``labels``; one chunk file per batch.

  Batch i uses ``fold_in(key(seed), i)`` and is saved as ``chunk_<i>.npz`` (tokens, labels).
  A chunk is reused when it exists, holds the expected labels and the set's ``meta.json``
  matches; a changed meta removes the old chunks. Returns (tokens [N, L], counts) with
  counts = {'generated': batches drawn now, 'loaded': batches read}. Process 0 writes the files;
  multi-host runs need a shared file system for resuming.
  """
  os.makedirs(folder, exist_ok=True)
  meta_path = os.path.join(folder, "meta.json")
  meta = canonical(dict(sset.meta, batch_size=batch, seed=seed))
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
    write_json(meta_path, meta)

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
      tokens = host_array(sset.sample_fn(jax.random.fold_in(base, i), devices.put_batch(padded.astype(np.int32))))
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
                   counts["loaded"] * batch, rate, fmt_seconds(eta) if math.isfinite(eta) else "?")
  if counts["generated"] == 0:
    logging.info("%s: all %d samples loaded from %s", sset.name, num, folder)
  return np.concatenate(out).astype(np.int32), counts


def time_sample_fn(sample_fn: Callable, labels: np.ndarray, devices: Devices, repeats: int,
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
def teacher_sample_fn(model, params, steps: int, sc, steps_flag: str = "config.evaluate.teacher_steps"):
  """``(fn(key, labels) -> tokens, meta)``: the iterative sampler that ``config.sample`` (or a
  ``SamplerSettings``) configures, at ``steps`` steps; ``steps_flag`` names the flag of a step
  count outside ``[1, seq_len]``. ``meta``: the sampler's name and settings."""
  sp = sc if isinstance(sc, SamplerSettings) else sampler_settings_from_config(sc)
  if sp.sampler not in samplers.SAMPLERS:
    raise ValueError(f"config.sample.sampler={sp.sampler!r} is not known; choose one of {samplers.SAMPLERS}")
  if not 1 <= steps <= model.seq_len:
    raise ValueError(f"{steps_flag}={steps}: step counts must be in [1, {model.seq_len}] (the sequence length)")
  kwargs = dict(sp.teacher_kwargs(), steps=int(steps))
  guidance = kwargs["guidance"]
  if guidance != 1.0 and not model.has_null_class:
    raise ValueError(f"config.sample.guidance={guidance} needs a null class, which model.arch='bert' lacks; "
                     "use --config.sample.guidance=1")
  if guidance != 1.0 and model.num_classes == 0:
    raise ValueError(f"config.sample.guidance={guidance} needs a class-conditional model, but this one is "
                     "unconditional; use --config.sample.guidance=1")
  kwargs.update(seq_len=model.seq_len, codebook_size=model.codebook_size,
                null_label=model.null_label if model.has_null_class else None)
  apply_fn = conditioning.make_apply_fn(model)
  if sp.sampler == "confidence":
    kwargs["r_temp"] = sp.r_temp
    sampler = samplers.confidence_sampler
  else:
    sampler = samplers.ancestral_sampler
  meta = dict(sampler=sp.sampler, **{k: v for k, v in kwargs.items() if k not in ("seq_len", "codebook_size")})
  return (lambda key, labels: sampler(apply_fn, params, key, labels, **kwargs)), meta


@functools.lru_cache(maxsize=16)
def _generator_program(model, r_init, sigma: float, top_k: int, top_p: float, steps: int = 1,
                       schedule="linear") -> Callable:
  """Jitted ``gen(params, key, labels, temperature) -> tokens`` (cached, so reruns reuse it): one step
  through ``samplers.one_step_generate``, ``steps`` > 1 through ``core.generator_steps.generate``
  with the re-masking levels of ``schedule``."""
  fixed, r_fn = r_init_value(r_init)

  @jax.jit
  def gen(params, key, labels, temp):
    if fixed is None:
      k_r, key = jax.random.split(key)
      r = r_fn(k_r)
    else:
      r = fixed
    if steps == 1:
      return samplers.one_step_generate(model, params, key, labels, r_init=r, sigma=sigma,
                                       temperature=temp, top_k=top_k, top_p=top_p)
    return gen_steps.generate(gen_steps.model_apply_fn(model, sigma), params, key, labels, steps=steps,
                              schedule=schedule, seq_len=model.seq_len, codebook_size=model.codebook_size,
                              r_init=r, temperature=temp, top_k=top_k, top_p=top_p)
  return gen


def generator_sample_fn(model, params, s: EvalSettings, sc, temperature: float, steps: int = 1,
                        schedule="linear") -> Tuple[Callable, dict]:
  """``fn(key, labels) -> tokens``: the generator's samples at ``steps`` steps (1: the one-step
  ``samplers.one_step_generate``; more: ``core.generator_steps.generate`` with ``schedule``)."""
  sp = sc if isinstance(sc, SamplerSettings) else sampler_settings_from_config(sc)
  top_k, top_p = sp.top_k, sp.top_p
  schedule = schedule if isinstance(schedule, str) else tuple(schedule)
  gen = _generator_program(model, s.r_init, float(s.sigma), top_k, top_p, int(steps), schedule)
  temp = jnp.float32(temperature)
  meta = dict(r_init=s.r_init, sigma=s.sigma, temperature=float(temperature), top_k=top_k, top_p=top_p)
  if steps > 1:
    meta.update(generator_steps=int(steps), generator_schedule=schedule if isinstance(schedule, str) else list(schedule))
  return (lambda key, labels: gen(params, key, labels, temp)), meta
