"""Feature extractors (VQGAN + FID Inception for images, grey values for token rasters, the
project's classifier for labelled tokens), reference features or statistics, and the scores
(FD, IS, accuracy, precision / recall / density / coverage) of one sample set.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from dimo_jax.converters import pytorch_fid
from dimo_jax.data import datasets
from dimo_jax.evaluation import classifier_features, fid_protocol, metrics
from dimo_jax.evaluation.sample_sets import Devices, _save_npz, _sha1, map_batches
from dimo_jax.evaluation.settings import EvalSettings
from dimo_jax.storage import loaders


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


def load_dataset(config, model):
  """The config's data set (None for data-free configs); sizes checked against the model."""
  dcfg = config.get("data", None) if hasattr(config, "get") else None
  if dcfg is None or dcfg.get("name", "none") in ("none", "", None):
    return None
  ds = datasets.load_dataset(dcfg)
  if ds.seq_len != model.seq_len or ds.vocab_size > model.codebook_size:
    raise ValueError(f"config.data ({ds.name}: vocab_size={ds.vocab_size}, seq_len={ds.seq_len}) does not match "
                     f"the model (codebook_size={model.codebook_size}, seq_len={model.seq_len}); pass the data "
                     "settings the teacher was trained with")
  return ds


def build_extractors(config, s: EvalSettings, ds, model, out_dir: str, devices: Devices) -> Extractors:
  ex = Extractors()
  vq = config.get("vqgan", None) if hasattr(config, "get") else None
  vq_path = vq.get("checkpoint", "") if vq is not None else ""
  batch = devices.round_batch(s.batch_size)
  if vq_path:
    if not s.inception_path:
      raise ValueError("config.vqgan.checkpoint is set (image tokens) but config.evaluate.inception_path is empty; "
                       "pass the FID Inception weights, e.g. --config.evaluate.inception_path="
                       "pt_inception-2015-12-05-6726825d.pth")
    vq_module, vq_vars = loaders.load_vqgan(vq_path)
    inc_apply, inc_vars = pytorch_fid.load_fid_inception(s.inception_path)
    inc_apply = fid_protocol.inception_apply(s.fid_protocol, inc_apply, inc_vars)
    vq_vars = devices.put_replicated(vq_vars)
    inc_vars = devices.put_replicated(inc_vars)
    decode = jax.jit(lambda v, t: vq_module.apply(v, t, method="decode_tokens"))
    both = jax.jit(lambda v, w, t: inc_apply(w, decode(v, t)))
    ex.decode = lambda tokens: map_batches(lambda t: decode(vq_vars, t), np.asarray(tokens, np.int32), batch,
                                            devices)
    ex.inception = lambda tokens: map_batches(lambda t: both(vq_vars, inc_vars, t), np.asarray(tokens, np.int32),
                                               batch, devices)
    ex.inception_images = lambda images: map_batches(lambda x: inc_apply(inc_vars, x),
                                                      np.asarray(images, np.float32), batch, devices)
    ex.inception_id = f"{os.path.abspath(s.inception_path)}|{os.path.abspath(vq_path)}" + \
        fid_protocol.cache_tag(s.fid_protocol)
    return ex
  if s.fid_protocol != "project":
    raise ValueError(f"config.evaluate.fid_protocol={s.fid_protocol!r} applies to images (config.vqgan.checkpoint "
                     "and config.evaluate.inception_path); token data sets are scored with fid_protocol='project'")
  if ds is None:
    raise ValueError("no feature extractor applies: the data set is config.data.name='none' and no VQGAN is set; "
                     "set config.vqgan.checkpoint and config.evaluate.inception_path (image tokens) or a data set")
  if ds.image_shape is not None:
    ex.pixel = lambda tokens: np.clip(np.asarray(tokens, np.float64), 0, ds.vocab_size - 1).reshape(len(tokens), -1)
  if ds.train_labels is not None and ds.num_classes >= 2:
    folder = s.classifier_dir or os.path.join(out_dir, "classifier")
    settings = classifier_features.settings_from_config(s.classifier)
    apply_fn, params, meta = classifier_features.load_or_train_classifier(ds, folder, settings=settings)
    ex.classifier = lambda tokens: classifier_features.predict(apply_fn, params, np.asarray(tokens, np.int32))
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


def build_reference(s: EvalSettings, ds, ex: Extractors, out_dir: str) -> Reference:
  if ex.inception is not None:
    fid_protocol.check_reference(s.fid_protocol, s.reference_stats)
  if ex.inception is not None and (s.reference_stats or s.reference_images):
    stats = fid_protocol.load_reference_stats(s.reference_stats, s.fid_protocol) if s.reference_stats else None
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
