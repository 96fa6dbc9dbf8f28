"""``TokenClassifier``: a small classifier of token sequences (an MLP over the flattened
embeddings, or a conv net over a grey image raster) whose penultimate layer gives features for
sample-quality metrics on data without an Inception network.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

pass

class TokenClassifier(nn.Module):
  """Token sequences [B, L] -> (features [B, feature_dim], logits [B, num_classes]), float32.

  Attributes:
    vocab_size: number of token values (inputs are clipped to [0, vocab_size)).
    seq_len: sequence length L.
    num_classes: number of classes.
    image_shape: (H, W) with H * W = L; the raster the conv net reads.
    arch: 'mlp' (flattened embeddings) or 'conv' (needs image_shape).
    embed_dim: token embedding width.
    channels: MLP hidden widths, or conv channels (every second conv has stride 2).
    feature_dim: width of the penultimate (feature) layer.
    dropout: dropout rate on the features during training.
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  vocab_size: int
  seq_len: int
  num_classes: int
  image_shape: Optional[Tuple[int, int]] = None
  arch: str = "mlp"
  embed_dim: int = 16
  channels: Tuple[int, ...] = (256,)
  feature_dim: int = 128
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True):
    if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
      raise ValueError(f"tokens must be [B, {self.seq_len}], got shape {tokens.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = jnp.clip(tokens.astype(jnp.int32), 0, self.vocab_size - 1)
    x = nn.Embed(self.vocab_size, self.embed_dim, name="embed", **kw)(tokens)  # [B, L, E]
    batch = tokens.shape[0]
    if self.arch == "conv":
      if self.image_shape is None:
        raise ValueError("arch='conv' needs image_shape (H, W); use arch='mlp' for other token data")
      h, w = self.image_shape
      x = x.reshape(batch, h, w, self.embed_dim)
      for i, ch in enumerate(self.channels):
        stride = 2 if i % 2 == 1 else 1
        x = nn.relu(nn.Conv(ch, (3, 3), strides=(stride, stride), padding="SAME", name=f"conv_{i}", **kw)(x))
      x = x.reshape(batch, -1)
    elif self.arch == "mlp":
      x = x.reshape(batch, -1)
      for i, ch in enumerate(self.channels):
        x = nn.relu(nn.Dense(ch, name=f"hidden_{i}", **kw)(x))
    else:
      raise ValueError(f"classifier arch must be 'mlp' or 'conv', got {self.arch!r}")
    feats = nn.relu(nn.Dense(self.feature_dim, name="features", **kw)(x))
    h = nn.Dropout(self.dropout, deterministic=deterministic)(feats)
    logits = nn.Dense(self.num_classes, name="head", **kw)(h)
    return feats.astype(jnp.float32), logits.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  """Architecture and training settings (stored in ``classifier.json``)."""
  arch: str = "mlp"
  embed_dim: int = 16
  channels: Tuple[int, ...] = (256,)
  feature_dim: int = 128
  dropout: float = 0.1
  steps: int = 400
  batch_size: int = 128
  lr: float = 3e-3
  weight_decay: float = 1e-4
  seed: int = 0

  def __post_init__(self):
    for name in ("embed_dim", "feature_dim", "steps", "batch_size"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"classifier setting {name} must be >= 1, got {getattr(self, name)!r}")
    if not self.channels or any(int(c) < 1 for c in self.channels):
      raise ValueError(f"classifier setting channels must be a non-empty list of positive ints, "
                       f"got {self.channels!r}")
    if self.arch not in ("mlp", "conv"):
      raise ValueError(f"classifier setting arch must be 'mlp' or 'conv', got {self.arch!r}")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"classifier setting dropout must be in [0, 1), got {self.dropout!r}")
    if float(self.lr) <= 0:
      raise ValueError(f"classifier setting lr must be > 0, got {self.lr!r}")

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["channels"] = [int(c) for c in self.channels]
    return d


def build_classifier(vocab_size: int, seq_len: int, num_classes: int, image_shape=None,
                     settings: Optional[ClassifierSettings] = None) -> TokenClassifier:
  """The classifier module for the given data sizes and settings."""
  s = settings or ClassifierSettings()
  if image_shape is not None:
    image_shape = tuple(int(v) for v in image_shape)
    if len(image_shape) != 2 or image_shape[0] * image_shape[1] != seq_len:
      raise ValueError(f"image_shape {image_shape} must be (H, W) with H * W = seq_len = {seq_len}")
  if s.arch == "conv" and image_shape is None:
    raise ValueError("classifier arch='conv' needs data with an image_shape; use arch='mlp'")
  if num_classes < 2:
    raise ValueError(f"the classifier needs labelled data with at least 2 classes, got num_classes={num_classes}")
  return TokenClassifier(vocab_size=int(vocab_size), seq_len=int(seq_len), num_classes=int(num_classes),
                         image_shape=image_shape, arch=s.arch, embed_dim=int(s.embed_dim),
                         channels=tuple(int(c) for c in s.channels), feature_dim=int(s.feature_dim),
                         dropout=float(s.dropout))


@functools.lru_cache(maxsize=16)
def make_apply_fn(model: TokenClassifier) -> Callable:
  """``apply_fn(params, tokens) -> (features, logits)`` in eval mode, jitted (cached per model)."""
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens, deterministic=True))
