"""The calling convention of text-conditioned token networks, in the class-conditional networks'
shape, so that the teacher's objective and Di[M]O's step serve both.

``TextTokenModel(net)`` wraps a ``networks.meissonic.MeissonicTransformer`` (no parameters of its
own: ``variables`` are the transformer's) and exposes what ``method.dimo`` and ``method.mdm_text``
read of a class-conditional network: ``codebook_size``, ``seq_len``, ``mask_id``, ``dropout``,
``clone(dropout=...)``, ``has_null_class`` (the negative prompt plays the null class),
``init_params(key)``, ``sampler_apply_fn()`` (the condition samplers' ``apply_fn``) and::

    logits = model.apply({"params": p}, tokens, cond, deterministic=True, noise_sigma=0.0,
                         rngs={"noise": key})   # [B, L, codebook_size + 1]

``cond`` is the condition pytree (``{"text", "pooled", "micro"}``), one entry per example. The
logits gain a mask column fixed at ``MASK_LOGIT`` (the class-conditional networks' layout: ``K``
codes plus the mask column, which no loss or divergence ever puts mass on). The timestep is
``timestep`` (Di[M]O feeds 0 to all three networks, the default). Meissonic has no dropout;
``deterministic`` is accepted and ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from dimo_jax.networks import conditioning, meissonic

MASK_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class TextTokenModel:
  """A Meissonic transformer in the token networks' convention (see the module docstring)."""
  net: Any  # meissonic.MeissonicTransformer
  timestep: float = 0.0
  text_len: int = 77
  dropout: float = 0.0

  num_classes = 0
  has_null_class = True

  @property
  def config(self) -> meissonic.MeissonicConfig:
    return self.net.config

  @property
  def codebook_size(self) -> int:
    return self.net.config.codebook_size

  @property
  def seq_len(self) -> int:
    return self.net.config.seq_len

  @property
  def mask_id(self) -> int:
    return self.net.config.mask_id

  def clone(self, **overrides) -> "TextTokenModel":
    """Meissonic has no dropout: only the recorded rate changes."""
    return dataclasses.replace(self, **{k: v for k, v in overrides.items() if k == "dropout"})

  def init_params(self, key):
    return meissonic.init_params(self.net.config, key, text_len=self.text_len)

  def sampler_apply_fn(self) -> Callable:
    """The condition samplers' ``apply_fn(params, tokens, cond, timestep, noise_sigma=0.0,
    rng=None)`` (``conditioning.make_apply_fn``): the sampler's step index is not fed (the network
    runs at its own ``timestep``, the one it was trained at) and the mask column is dropped."""
    return conditioning.make_apply_fn(self, conditions=True, feed_timestep=False,
                                      num_logits=self.codebook_size)

  def apply(self, variables: Mapping[str, Any], tokens, cond, *, deterministic: bool = True,
            noise_sigma=0.0, rngs: Optional[Mapping[str, Any]] = None):
    del deterministic
    noise = (rngs or {}).get("noise")
    logits = self.net.apply(variables, tokens, cond, timestep=self.timestep, noise_sigma=noise_sigma,
                            rngs={} if noise is None else {"noise": noise})
    pad = jnp.full((*logits.shape[:-1], 1), MASK_LOGIT, logits.dtype)
    return jnp.concatenate([logits, pad], axis=-1)


def build(config: meissonic.MeissonicConfig, text_len: int = 77) -> TextTokenModel:
  return TextTokenModel(meissonic.MeissonicTransformer(config), text_len=int(text_len))


def batch_of(cond) -> int:
  """The leading (batch) size of a condition pytree."""
  return int(jax.tree_util.tree_leaves(cond)[0].shape[0])
