"""FID protocols: how images become Inception features and which reference statistics they meet
(``config.evaluate.fid_protocol``; ``docs/fid_protocol.md`` explains the choice).

- ``project``: the decoded images as floats in [0, 1], resized to 299 x 299 by the network
  (bilinear with half-pixel centres, as ``F.interpolate(align_corners=False)``) and scaled to
  [-1, 1] by ``2 x - 1``: pytorch-fid's preprocessing. Reference: ``reference_stats``,
  ``reference_images`` or the data set.
- ``paper``: clean-fid's ``legacy_tensorflow`` mode, as the Di[M]O authors computed Table 1:
  1. images quantised to the 8-bit values of the PNG files they were saved as,
     ``floor(255 x + 0.5)`` clipped to 0..255 (the authors' ``(127.5 x + 128).clip(0, 255).to(uint8)``
     on [-1, 1] images);
  2. those values as float32 in [0, 255] (clean-fid's resizer is the identity in this mode);
  3. resized to 299 x 299 inside the network as TensorFlow 1's ``ResizeBilinear`` with
     ``align_corners=False`` and no half-pixel centres: output pixel i reads source position
     ``i * in / out``, the last source row / column repeated at the edge;
  4. ``(x - 128) / 128``;
  5. the 2015-12-05 Inception graph (this project's FID Inception with pytorch-fid's weights, the
     same graph), pool3 features [N, 2048];
  6. FID against the ADM ImageNet-256 reference statistics the user brings
     (``fid_stats_imagenet256_guided_diffusion.npz`` or ``VIRTUAL_imagenet256_labeled.npz``,
     arrays ``mu`` and ``sigma``).
  The logits for the Inception score leave out the output layer's bias, as torch-fidelity (which
  gave the paper's IS column) does.
"""

from __future__ import annotations

from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.evaluation import metrics
from dimo_jax.networks.inception import FID_INPUT_SIZE, POOL_FEATURES, InceptionV3

PROTOCOLS = ("project", "paper")
ADM_FILES = "fid_stats_imagenet256_guided_diffusion.npz or VIRTUAL_imagenet256_labeled.npz"


def check_protocol(protocol: str) -> str:
  if protocol not in PROTOCOLS:
    raise ValueError(f"config.evaluate.fid_protocol={protocol!r} is not valid; choose one of {list(PROTOCOLS)} "
                     "('paper': comparable with the paper's Table 1, see docs/fid_protocol.md)")
  return protocol


# ---------------------------------------------------------------------------- paper preprocessing
def quantize_8bit(images):
  """[0, 1] floats -> the 8-bit values a PNG stores, ``floor(255 x + 0.5)`` in 0..255, as float32."""
  x = jnp.clip(jnp.asarray(images, jnp.float32), 0.0, 1.0)
  return jnp.floor(x * 255.0 + 0.5)


def tf1_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 matrix of TensorFlow 1's ``ResizeBilinear`` (``align_corners=False``,
  ``half_pixel_centers=False``) along one axis: output i reads ``p = i * (in / out)`` (float32, as
  TensorFlow computes it), ``(1 - f)`` of row ``floor(p)`` and ``f`` of ``min(floor(p) + 1, in - 1)``."""
  scale = np.float32(in_size) / np.float32(out_size)
  pos = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (pos - lo.astype(np.float32)).astype(np.float32)
  w = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(w, (rows, lo), 1.0 - frac)
  np.add.at(w, (rows, hi), frac)
  return w


def resize_bilinear_tf1(images, size: int = FID_INPUT_SIZE):
  """NHWC images resized to size x size as TensorFlow 1's ``ResizeBilinear`` (see
  ``tf1_bilinear_weights``); identity at that size already."""
  n, h, w, c = images.shape
  x = jnp.asarray(images, jnp.float32)
  if (h, w) == (size, size):
    return x
  wh = jnp.asarray(tf1_bilinear_weights(h, size))
  ww = jnp.asarray(tf1_bilinear_weights(w, size))
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", wh, x, precision=hp)
  return jnp.einsum("pw,nowc->nopc", ww, x, precision=hp)


def paper_inputs(images):
  """[0, 1] images [N, H, W, 3] -> the paper protocol's Inception input [N, 299, 299, 3]
  (steps 1 to 4 of the module docstring)."""
  return (resize_bilinear_tf1(quantize_8bit(images)) - 128.0) / 128.0


# ---------------------------------------------------------------------------- features
def inception_apply(protocol: str, apply_fn: Callable, variables) -> Callable:
  """``fn(variables, images in [0, 1]) -> (pool, logits)`` of ``protocol``.

  ``apply_fn`` / ``variables`` are the FID Inception as ``converters.pytorch_fid.load_fid_inception``
  returns it ('project' uses ``apply_fn`` as is); 'paper' runs the same variables through an
  ``InceptionV3`` that takes the already resized and scaled ``paper_inputs`` (jitted)."""
  check_protocol(protocol)
  if protocol == "project":
    return apply_fn
  num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
  module = InceptionV3(num_classes=num_classes, resize_input=False, normalize_input=False)

  def apply_paper(v, images):
    pool, logits = module.apply(v, paper_inputs(images))
    return pool, logits - v["params"]["fc"]["bias"].astype(logits.dtype)

  return jax.jit(apply_paper)


def cache_tag(protocol: str) -> str:
  """Suffix of the feature caches' keys ('' for 'project', so its caches stay valid)."""
  return "" if protocol == "project" else f"|fid_protocol={protocol}"


def load_reference_stats(path: str, protocol: str) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from an .npz with arrays ``mu`` [D] and ``sigma`` [D, D] (the error names the keys
  found); the paper protocol also needs D = 2048 (Inception pool3)."""
  try:
    mu, sigma = metrics.load_reference_stats(path)
  except ValueError as e:
    if protocol != "paper":
      raise
    raise ValueError(f"{e} fid_protocol='paper' needs the ADM ImageNet-256 reference statistics "
                     f"({ADM_FILES}).") from e
  if protocol == "paper" and mu.shape[0] != POOL_FEATURES:
    raise ValueError(f"{path}: mu has {mu.shape[0]} features; fid_protocol='paper' compares Inception pool3 "
                     f"features ({POOL_FEATURES}), as in the ADM ImageNet-256 reference statistics ({ADM_FILES})")
  return mu, sigma


def check_reference(protocol: str, reference_stats: str) -> None:
  """The paper protocol's FID is against the ADM reference statistics: they must be given."""
  if protocol == "paper" and not reference_stats:
    raise ValueError("config.evaluate.fid_protocol='paper' computes FID against the ADM ImageNet-256 reference "
                     f"statistics: set config.evaluate.reference_stats to {ADM_FILES} (arrays mu and sigma)")
