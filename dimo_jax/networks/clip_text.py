"""CLIP text tower (transformers ``CLIPTextModelWithProjection`` layout), as Meissonic uses it.

At the defaults it is the OpenCLIP ViT-H/14 text tower of Meissonic's ``text_encoder/``
(``reference/meissonic_reference.md`` sections 3 and 10.3): vocabulary 49408, 77 learned
positions, 24 causal pre-LN layers of width 1024 with 16 heads of 64 and an MLP of 4096 with exact
(erf) GELU, LayerNorm eps 1e-5, a final LayerNorm and a bias-free projection to 1024;
354,032,640 parameters.

One layer: ``x + out_proj(attn(layer_norm1(x)))`` (causal, scale ``head_dim ** -0.5``), then
``x + fc2(act(fc1(layer_norm2(x))))``. The model returns what Meissonic consumes:

- ``penultimate`` ``[B, L, width]``: transformers' ``hidden_states[-2]``, the output of the
  second-to-last layer (layer 23 of 24), with NO final LayerNorm; Meissonic's sequence condition.
- ``pooled`` ``[B, projection_dim]``: transformers' ``text_embeds``, ``text_projection`` of the
  final-LayerNormed state at the end-of-text position; Meissonic's pooled condition.
- ``last_hidden_state`` ``[B, L, width]``: the final-LayerNormed output of the last layer.

End-of-text position: with ``eos_token_id == 2`` (the value in the released config, kept from
older transformers) transformers pools at ``argmax(input_ids)``, which is the first ``49407``
(``<|endoftext|>``, the largest id of the CLIP vocabulary) in a tokenised prompt; any other
``eos_token_id`` pools at the first position holding that id. Both rules are implemented.

LayerNorms compute the variance in two passes (mean of ``(x - mean)^2``), as PyTorch does, so
activations that share a large offset keep their precision. Layers run under ``nn.scan``
(parameters stacked on axis 0 under ``layers``) with an optional rematerialisation policy
(``attention.REMAT_POLICIES``); attention is ``networks.attention``'s, causal, with the
``attention_impl`` switch (XLA with the fused backward by default, cuDNN);
``dtype`` is the computation dtype, ``param_dtype`` the storage dtype.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimo_jax.networks.attention import REMAT_POLICIES, attention, check_implementation

Dtype = Any

# transformers' ``hidden_act`` names -> the activation used here.
ACTIVATIONS: Dict[str, Callable] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Architecture of the text tower; the defaults are CLIP-ViT-H/14 (Meissonic's text encoder)."""
  vocab_size: int = 49408
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  max_positions: int = 77
  activation: str = "gelu"  # exact GELU (OpenCLIP ViT-H); OpenAI's CLIP uses "quick_gelu"
  ln_eps: float = 1e-5
  projection_dim: int = 1024
  eos_token_id: int = 2  # 2: pool at argmax(input_ids); otherwise at the first eos_token_id

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"CLIPTextConfig.activation {self.activation!r} is not supported; choose "
                       f"one of {sorted(ACTIVATIONS)}.")
    if self.width % self.heads:
      raise ValueError(f"CLIPTextConfig: width {self.width} is not divisible by heads "
                       f"{self.heads}.")
    if self.layers < 2:
      raise ValueError("CLIPTextConfig.layers must be at least 2 (the penultimate state is "
                       "returned).")

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"CLIPTextConfig: unknown fields {unknown}; known: {sorted(names)}.")
    return cls(**dict(d))

  @classmethod
  def tiny(cls, **overrides) -> "CLIPTextConfig":
    """A three-layer test configuration."""
    fields = dict(vocab_size=64, width=32, layers=3, heads=4, mlp_dim=64, max_positions=16,
                  projection_dim=24)
    fields.update(overrides)
    return cls(**fields)


def layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  """LayerNorm with the two-pass variance (statistics in float32), as PyTorch computes it."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class CLIPLayer(nn.Module):
  """One causal pre-LN layer; a scan body ``((x, previous_x), None) -> ((y, x), None)``."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, carry, _=None):
    x, _ = carry
    c = self.config
    b, t, _ = x.shape
    head_dim = c.width // c.heads
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(c.ln_eps, "layer_norm1", self.dtype, self.param_dtype)(x)
    q, k, v = (dense(c.width, name=f"{n}_proj")(h).reshape(b, t, c.heads, head_dim)
               for n in ("q", "k", "v"))
    a = attention(q, k, v, self.attention_impl, causal=True)
    y = x + dense(c.width, name="out_proj")(a.reshape(b, t, c.width))
    h = layer_norm(c.ln_eps, "layer_norm2", self.dtype, self.param_dtype)(y)
    h = ACTIVATIONS[c.activation](dense(c.mlp_dim, name="fc1")(h))
    y = y + dense(c.width, name="fc2")(h)
    return (y, x), None


class CLIPTextModel(nn.Module):
  """Ids ``[B, L]`` (``L <= max_positions``) -> ``{'penultimate', 'pooled', 'last_hidden_state'}``.

  No attention mask is taken: Meissonic feeds all 77 positions, pads included. ``attention_impl``
  is an implementation of ``networks.attention`` (``""``/None, ``"xla"``, ``"cudnn"``,
  ``"xla_saved"``).
  """
  config: CLIPTextConfig = CLIPTextConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids) -> Dict[str, jax.Array]:
    c = self.config
    check_implementation(self.attention_impl, "attention_impl")
    if input_ids.ndim != 2 or input_ids.shape[1] > c.max_positions:
      raise ValueError(f"input_ids must have shape [B, L] with L <= {c.max_positions}; got "
                       f"{input_ids.shape}.")
    input_ids = input_ids.astype(jnp.int32)
    embed = functools.partial(nn.Embed, features=c.width, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    x = embed(c.vocab_size, name="token_embedding")(input_ids)
    x = x + embed(c.max_positions, name="position_embedding")(jnp.arange(input_ids.shape[1]))[None]

    layer = CLIPLayer
    if self.remat and self.remat != "none":
      if self.remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {self.remat!r}; choose one of "
                         f"{['none', *REMAT_POLICIES]}.")
      layer = nn.remat(CLIPLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=c.layers, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, penultimate), _ = scanned(c, self.dtype, self.param_dtype, self.attention_impl,
                                  name="layers")((x, x), None)

    last = layer_norm(c.ln_eps, "final_layer_norm", self.dtype, self.param_dtype)(x)
    if c.eos_token_id == 2:
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
    pooled = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="text_projection")(pooled)
    return {"penultimate": penultimate, "pooled": pooled, "last_hidden_state": last}


def abstract_params(config: CLIPTextConfig, param_dtype: Dtype = jnp.float32):
  """Parameter shapes of the model by ``jax.eval_shape`` (nothing is allocated)."""
  ids = jax.ShapeDtypeStruct((1, config.max_positions), jnp.int32)
  model = CLIPTextModel(config, param_dtype=param_dtype)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]


def param_count(config: CLIPTextConfig) -> int:
  """Number of parameters (354,032,640 at the released configuration)."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(abstract_params(config))))
