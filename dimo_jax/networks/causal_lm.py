"""The reference language model of the text metrics: a small causal transformer.

``logits = model.apply({'params': p}, tokens, deterministic=True)``: ``tokens`` int32 ``[B, T]``
(``T <= seq_len``), logits ``[B, T, V]`` where position t predicts token t + 1. The evaluation
feeds ``[bos, x_0, ..., x_{L-2}]`` to score ``x_0 .. x_{L-1}`` (``evaluation.text_metrics``).
The blocks are the text teacher's (``networks.text_mdm.RotaryBlock``) with a causal mask; it is
trained apart from the teacher, on the training split only, by ``method.causal_lm``.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from dimo_jax.networks import maskgit, text_mdm


class CausalLM(nn.Module):
  vocab_size: int = 257
  seq_len: int = 64
  width: int = 128
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 512
  dropout: float = 0.0
  ln_eps: float = 1e-5
  gelu_approximate: bool = True
  dtype: maskgit.Dtype = jnp.float32
  param_dtype: maskgit.Dtype = jnp.float32
  scan: bool = True
  remat: str = "none"
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[-1] > self.seq_len:
      raise ValueError(f"the reference LM reads at most seq_len={self.seq_len} tokens, got {tokens.shape[-1]}")
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=nn.initializers.normal(0.02), name="tok_emb")(tokens)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    kwargs = dict(text_mdm.block_kwargs(self, deterministic), causal=True)
    x = maskgit._stack(text_mdm.RotaryBlock, self.depth, self.scan, self.remat, kwargs, x)  # pylint: disable=protected-access
    x = maskgit.layer_norm(self.ln_eps, self.dtype, self.param_dtype)(name="out_ln")(x)
    return nn.Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x).astype(
        jnp.float32)

  def init_params(self, key):
    return self.init({"params": key}, jnp.zeros((1, self.seq_len), jnp.int32))["params"]


def build_model(lm_cfg, *, vocab_size: int, seq_len: int) -> CausalLM:
  """The reference LM from a ``config.evaluate.reference_lm`` ConfigDict and the corpus' sizes."""
  get = lm_cfg.get
  width, heads = int(get("width", 128)), int(get("heads", 4))
  if width % heads:
    raise ValueError(f"config.evaluate.reference_lm.width={width} must be divisible by heads={heads}")
  return CausalLM(vocab_size=int(vocab_size), seq_len=int(seq_len), width=width, depth=int(get("depth", 2)),
                  heads=heads, mlp_dim=int(get("mlp_dim", 4 * width)), dropout=float(get("dropout", 0.0)),
                  dtype=maskgit.to_dtype(get("dtype", "float32")),
                  param_dtype=maskgit.to_dtype(get("param_dtype", "float32")), scan=bool(get("scan", True)),
                  remat=get("remat", "none"))
