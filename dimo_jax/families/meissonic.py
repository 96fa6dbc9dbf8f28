"""``config.family = "meissonic"``: converted Meissonic text-to-image networks (``configs/meissonic.py``),
distilled data-free from a prompt file with the authors' recipe (``config.distill``).

No teacher is trained here (convert the released one). The distillation's teacher is the
converted transformer (``evaluation.text_to_image.load_networks``) with ``config.distill.param_dtype``
master weights computing in ``compute_dtype`` with ``remat``, presented in the token networks'
convention (``networks.text_conditioning``: timestep 0, the micro-conditions
``config.sample.micro_conds``). Prompt conditions are CLIP's penultimate states and pooled
embedding: with ``config.distill.text_cache`` every prompt is encoded once and cached
(``data.prompt_cache``); without it each step's prompts go through the CLIP tower under
``jax.jit``. A step's prompts are a pure function of ``(seed, step)``; the negative prompt's
condition is encoded once. No prompt is encoded before the distillation step is compiled, so a
step that cannot fit the device is refused before any network runs. The generator's ``config.json`` holds ``meissonic_config``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.data import prompt_cache, text
from dimo_jax.evaluation import text_to_image
from dimo_jax.evaluation.sample_sets import params_fingerprint
from dimo_jax.families import base
from dimo_jax.networks import meissonic, text_conditioning


def _with_micro(cond: Dict[str, np.ndarray], micro: np.ndarray) -> Dict[str, np.ndarray]:
  lead = cond["pooled"].shape[:-1]
  return {"text": cond["text"], "pooled": cond["pooled"],
          "micro": np.broadcast_to(micro, (*lead, micro.shape[-1])).astype(np.float32)}


def read_distill_prompts(config):
  """The prompts of ``config.distill.prompts`` (an empty key, an empty file or a line over the
  length limit stops here, before any network loads)."""
  dc = config.distill
  if not dc.get("prompts", ""):
    raise ValueError("config.distill.prompts is empty; pass --config.distill.prompts=<file> (one prompt per line)")
  return text.read_prompts(dc.prompts)


class PromptFile(base.ConditionSource):
  """The prompts of a file through the CLIP tower (or its cache), with the micro-conditions.

  Building one reads the prompts (and an existing cache, checked against its fingerprint) and runs
  no network: the negative prompt is encoded, and a missing cache built, at the first
  ``step_conditions`` / ``negative``, after the distillation step has been compiled and its
  memory checked."""

  def __init__(self, config, nets, text_dim: int, pooled_dim: int):
    dc = config.distill
    self.prompts = read_distill_prompts(config)
    self.nets = nets
    self.micro = np.asarray(config.sample.micro_conds, np.float32)
    text_len = nets.text_model.config.max_positions
    self.spec = {"text": jax.ShapeDtypeStruct((text_len, text_dim), jnp.float32),
                 "pooled": jax.ShapeDtypeStruct((pooled_dim,), jnp.float32),
                 "micro": jax.ShapeDtypeStruct((self.micro.shape[0],), jnp.float32)}
    self.negative_prompt = dc.negative_prompt
    self.cache_path, self.prompts_path = dc.get("text_cache", ""), dc.prompts
    self.cache_batch = int(config.sample.get("batch_size", 4)) * 8
    self._neg = self._table = None
    if self.cache_path and os.path.exists(self.cache_path):
      self._cache_table()  # an existing cache is read and checked now

  def _cache_table(self):
    """Every prompt's condition from the cache (read, or built and written, once), or None."""
    if self._table is None and self.cache_path:
      fp = prompt_cache.cache_fingerprint(self.prompts_path, self.nets.tokenizer,
                                          params_fingerprint(self.nets.text_params))
      self._table = prompt_cache.load_or_build_cache(self.cache_path, fp, lambda: text_to_image.encode_prompts(
          self.nets, self.prompts, self.cache_batch))
    return self._table

  def _conditions(self, idx):
    table = self._cache_table()
    if table is not None:
      return {k: v[idx] for k, v in table.items()}
    flat = np.asarray(idx).reshape(-1)
    enc = text_to_image.encode_prompts(self.nets, [self.prompts[i] for i in flat], len(flat))
    return {k: v.reshape(*np.shape(idx), *v.shape[1:]) for k, v in enc.items()}

  def step_conditions(self, seed: int, step: int, batch: int, aux_updates: int) -> dict:
    rng = np.random.default_rng([int(seed), 11, int(step)])
    gen, aux = rng.integers(0, len(self.prompts), (batch,)), rng.integers(0, len(self.prompts), (aux_updates, batch))
    return {"gen": _with_micro(self._conditions(gen), self.micro),
            "aux": _with_micro(self._conditions(aux), self.micro), "neg": self.negative()}

  def negative(self):
    if self._neg is None:
      self._neg = text_to_image.encode_prompts(self.nets, [self.negative_prompt], 1)
    return _with_micro(self._neg, self.micro)


class Meissonic(base.Family):
  """Converted Meissonic text-to-image (module docstring)."""

  name = "meissonic"
  compute_fields = ()
  evaluators = ("t2i_export",)

  def prepare_distill(self, config, workdir: str) -> None:
    read_distill_prompts(config)

  def mesh_axes(self, config):
    data, fsdp = super().mesh_axes(config)
    return data, (jax.device_count() if fsdp < 1 else fsdp)

  def load_teacher(self, config, workdir: str) -> base.Loaded:
    dc = config.distill
    config = copy.deepcopy(config)
    config.meissonic.param_dtype = dc.param_dtype
    nets = text_to_image.load_networks(config, int(config.sample.resolution))
    tcfg = dataclasses.replace(nets.transformer.config, dtype=dc.compute_dtype, param_dtype=dc.param_dtype,
                               remat=dc.remat)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.dtype(dc.param_dtype)), nets.transformer_params)
    model = text_conditioning.TextTokenModel(meissonic.MeissonicTransformer(tcfg),
                                             text_len=nets.text_model.config.max_positions)
    return base.Loaded(model, params, {"meissonic_config": tcfg.to_dict()}, extras={"networks": nets})

  def load_generator(self, config, path: str) -> base.Loaded:
    nets = text_to_image.load_networks(config, int(config.sample.resolution), path)
    model = text_conditioning.TextTokenModel(nets.transformer, text_len=nets.text_model.config.max_positions)
    return base.Loaded(model, nets.transformer_params, {"meissonic_config": nets.transformer.config.to_dict()},
                       extras={"networks": nets})

  def condition_source(self, config, teacher: base.Loaded) -> base.ConditionSource:
    tcfg = teacher.model.net.config
    return PromptFile(config, teacher.extras["networks"], tcfg.text_dim, tcfg.pooled_dim)

  def run_config(self, config, teacher: base.Loaded) -> dict:
    return dict(super().run_config(config, teacher), role="distill")

  def network_config(self, teacher: base.Loaded, model) -> dict:
    return {"meissonic_config": teacher.stored["meissonic_config"]}


FAMILY = Meissonic()
