"""``mode=distill`` for Meissonic (``configs/meissonic.py``): Di[M]O of the converted Meissonic
transformer into a one-step text-to-image generator, data-free from a prompt file, with the
authors' recipe (``config.distill``, reference section 5.1).

1. ``config.distill.prompts`` is read first (one prompt per line; an empty file or a line over
   the length limit stops here, before any network is loaded).
2. The converted networks are loaded (``modes.sample_text.load_networks``; the transformer with
   ``config.distill.param_dtype`` master weights, computing in ``compute_dtype``, with
   ``remat``). Teacher, generator and auxiliary share its architecture; Di[M]O feeds timestep 0
   to all three (``networks.text_conditioning``) and the micro-conditions
   ``config.sample.micro_conds``.
3. Prompt conditions (CLIP's penultimate states and pooled embedding): with
   ``config.distill.text_cache`` every prompt is encoded once and cached in that ``.npz``,
   beside a fingerprint of the prompt file, the tokenizer and the text encoder's weights (a cache
   whose fingerprint differs stops with what differs); without it, each step's prompts are
   encoded by the CLIP tower under ``jax.jit``.
4. The step is compiled for the SHAPES of the state (nothing allocated) and the run stops, before
   the first update, with XLA's estimate and the remedies when it cannot fit the device
   (``Distiller.check_fits_abstract``).
5. Each step draws ``batch_size`` prompts for the generator update and ``aux_updates x
   batch_size`` fresh ones for the auxiliary (a pure function of ``(seed, step)``); the negative
   prompt's condition is encoded once. Parameters and Adam states are sharded over the mesh's
   ``fsdp`` axis (``config.mesh.fsdp=-1``: every device). Checkpoints in ``<workdir>/checkpoints``
   (a rerun resumes), the EMA generator in ``<workdir>/generator`` at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dimo_jax.core import sharding
from dimo_jax.data import text
from dimo_jax.evaluation.sample_sets import params_fingerprint
from dimo_jax.method import dimo
from dimo_jax.modes import loop, sample_text
from dimo_jax.networks import meissonic, text_conditioning
from dimo_jax.storage import checkpoints

CACHE_FORMAT = 1


def file_sha1(path: str) -> str:
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def cache_fingerprint(prompts_path: str, tokenizer, text_params) -> Dict[str, Any]:
  """What a condition cache depends on: the prompt file, the tokenizer and the encoder's weights."""
  return {"format": CACHE_FORMAT, "prompts_sha1": file_sha1(prompts_path), "tokenizer": str(tokenizer.source),
          "tokenizer_vocab": int(tokenizer.vocab_size), "max_length": int(tokenizer.max_length),
          "text_encoder": params_fingerprint(text_params)}


def load_or_build_cache(path: str, fingerprint: Dict[str, Any], build: Callable[[], Dict[str, np.ndarray]]):
  """The cached conditions of every prompt, built and written when ``path`` does not exist."""
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      stored = json.loads(str(f["fingerprint"]))
      diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
      if diff:
        raise ValueError(f"config.distill.text_cache={path} was written for another "
                         f"{', '.join(diff)} than this run's ({', '.join(f'{k}: {stored.get(k)} != {fingerprint.get(k)}' for k in diff)}); "
                         "delete it or point --config.distill.text_cache to a new file")
      return {"text": f["text"], "pooled": f["pooled"]}
  table = build()
  tmp = path + ".tmp.npz"
  np.savez(tmp, text=table["text"], pooled=table["pooled"], fingerprint=json.dumps(fingerprint, sort_keys=True))
  os.replace(tmp, path)
  logging.info("Cached the conditions of %d prompts in %s.", len(table["pooled"]), path)
  return table


def step_prompts(num_prompts: int, step: int, seed: int, batch: int, aux_updates: int):
  """Prompt indices ``(gen [B], aux [A, B])`` of one step: a pure function of (seed, step)."""
  rng = np.random.default_rng([int(seed), 11, int(step)])
  return rng.integers(0, num_prompts, (batch,)), rng.integers(0, num_prompts, (aux_updates, batch))


def _with_micro(cond: Dict[str, np.ndarray], micro: np.ndarray) -> Dict[str, np.ndarray]:
  lead = cond["pooled"].shape[:-1]
  return {"text": cond["text"], "pooled": cond["pooled"],
          "micro": np.broadcast_to(micro, (*lead, micro.shape[-1])).astype(np.float32)}


def train_distill_meissonic(config, workdir: str, *, stop_after: Optional[int] = None) -> dict:
  """The whole run (see the module docstring); returns the last logged metrics."""
  dc = config.distill
  if not dc.get("prompts", ""):
    raise ValueError("config.distill.prompts is empty; pass --config.distill.prompts=<file> (one prompt per line)")
  prompts = text.read_prompts(dc.prompts)
  steps, stop_after, workdir = loop.loop_setup(dc, "distill", workdir, stop_after)
  config = copy.deepcopy(config)
  config.meissonic.param_dtype = dc.param_dtype
  nets = sample_text.load_networks(config, int(config.sample.resolution))
  tcfg = dataclasses.replace(nets.transformer.config, dtype=dc.compute_dtype, param_dtype=dc.param_dtype,
                             remat=dc.remat)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.dtype(dc.param_dtype)), nets.transformer_params)
  text_len = nets.text_model.config.max_positions
  model = text_conditioning.TextTokenModel(meissonic.MeissonicTransformer(tcfg), text_len=text_len)
  micro = np.asarray(config.sample.micro_conds, np.float32)
  cond_spec = {"text": jax.ShapeDtypeStruct((text_len, tcfg.text_dim), jnp.float32),
               "pooled": jax.ShapeDtypeStruct((tcfg.pooled_dim,), jnp.float32),
               "micro": jax.ShapeDtypeStruct((micro.shape[0],), jnp.float32)}
  dist = dimo.build_distiller(config, model, cond_spec=cond_spec)
  fsdp = int(config.mesh.get("fsdp", 1))
  mesh = sharding.make_mesh(int(config.mesh.get("data", -1)), jax.device_count() if fsdp < 1 else fsdp)

  shapes = jax.eval_shape(lambda p: dist.init_state(p, int(config.seed)), params)
  need = dist.check_fits_abstract(shapes, mesh)  # refuses here, before anything large is allocated
  if need:
    logging.info("XLA's estimate of the step: %.1f GB per device.", need / 1e9)

  neg = sample_text.encode_prompts(nets, [dc.negative_prompt], 1)
  if dc.get("text_cache", ""):
    fp = cache_fingerprint(dc.prompts, nets.tokenizer, nets.text_params)
    table = load_or_build_cache(dc.text_cache, fp, lambda: sample_text.encode_prompts(
        nets, prompts, int(config.sample.get("batch_size", 4)) * 8))
    conditions = lambda idx: {k: v[idx] for k, v in table.items()}
  else:
    def conditions(idx):
      flat = np.asarray(idx).reshape(-1)
      enc = sample_text.encode_prompts(nets, [prompts[i] for i in flat], len(flat))
      return {k: v.reshape(*np.shape(idx), *v.shape[1:]) for k, v in enc.items()}

  state = dist.init_state(params, int(config.seed))
  del params
  ckpt, start = loop.make_checkpointer(dc, "distill", workdir, steps)
  final: Dict[str, Any] = {}
  try:
    step_fn, state = dist.jit_step(state, mesh)
    if start:
      state = ckpt.restore(start, state)
    logging.info("Di[M]O (Meissonic): %d prompts, %d steps at batch %d on %d devices.", len(prompts), steps,
                 dist.s.batch_size, mesh.size)
    history, t0, step = [], time.time(), start
    last = min(steps, stop_after or steps)
    with loop.PreemptionGuard() as guard:
      while step < last:
        gen_idx, aux_idx = step_prompts(len(prompts), step, int(config.seed), dist.s.batch_size, dist.s.aux_updates)
        conds = {"gen": _with_micro(conditions(gen_idx), micro), "aux": _with_micro(conditions(aux_idx), micro),
                 "neg": _with_micro(neg, micro)}
        state, metrics = step_fn(state, dist.place_conditions(conds))
        step += 1
        history.append(metrics)
        if step % int(dc.get("log_every", 50)) == 0 or step == last:
          final = {k: float(np.mean([float(m[k]) for m in history])) for k in history[0]}
          logging.info("distill step %d (%.1fs): %s", step, time.time() - t0,
                       ", ".join(f"{k} {v:.4g}" for k, v in sorted(final.items())))
          history = []
        ckpt.save(step, state, force=step == steps or guard.requested)
        if guard.requested:
          break
    ckpt.wait()
    if step == steps:
      cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
      checkpoints.save_params(os.path.join(workdir, "generator"), jax.device_get(state.gen.params),
                              dict(cfg, meissonic_config=tcfg.to_dict(), role="generator"),
                              ema_params=jax.device_get(state.ema_params), step=step)
    final["step"] = step
  finally:
    ckpt.close()
  return final


run = loop.entry(train_distill_meissonic)
