"""Training, caching and applying the token classifier (``networks.classifier``) used as a
feature extractor on data without an Inception network.

``train_classifier`` fits it with AdamW on the training split; ``load_or_train_classifier``
caches the result in a folder (``classifier.msgpack`` with the parameters, ``classifier.json``
with the architecture, training settings, a fingerprint of the data and the validation
accuracy) and reuses it when all of these match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization

from dimo_jax.networks.classifier import ClassifierSettings, build_classifier, make_apply_fn
from dimo_jax.storage import checkpoints

Dtype = Any
PARAMS_FILE = "classifier.msgpack"
META_FILE = "classifier.json"
FORMAT_VERSION = 1


def _check_dataset(dataset):
  for name in ("train_tokens", "train_labels", "val_tokens", "val_labels", "vocab_size", "num_classes"):
    if not hasattr(dataset, name):
      raise ValueError(f"dataset must be a dimo_jax.data.datasets.TokenDataset (missing attribute {name!r})")
  if dataset.train_labels is None or dataset.num_classes < 2:
    raise ValueError(f"dataset {getattr(dataset, 'name', '')!r} has no class labels (num_classes="
                     f"{dataset.num_classes}); the classifier needs labelled data (data.labels for npy)")


def predict(apply_fn: Callable, params, tokens, batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
  """Features [N, D] and logits [N, C] (NumPy float32) in batches of ``batch_size`` (the last
  one padded, so one compiled program serves every call)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[0] == 0:
    raise ValueError(f"tokens must be a non-empty [N, L] array, got shape {tokens.shape}")
  feats, logits = [], []
  for start in range(0, tokens.shape[0], batch_size):
    chunk = tokens[start:start + batch_size]
    n = chunk.shape[0]
    if n < batch_size:  # one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    f, l = apply_fn(params, jnp.asarray(chunk, jnp.int32))
    feats.append(np.asarray(f)[:n])
    logits.append(np.asarray(l)[:n])
  return np.concatenate(feats), np.concatenate(logits)


def accuracy(apply_fn: Callable, params, tokens, labels, batch_size: int = 256) -> float:
  """Fraction of ``tokens`` whose argmax logit equals ``labels``."""
  labels = np.asarray(labels)
  _, logits = predict(apply_fn, params, tokens, batch_size)
  if labels.shape != (logits.shape[0],):
    raise ValueError(f"labels must have shape ({logits.shape[0]},), got {labels.shape}")
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def train_classifier(dataset, steps: Optional[int] = None, seed: Optional[int] = None, *,
                     settings: Optional[ClassifierSettings] = None) -> Tuple[Callable, Any]:
  """Fits the classifier on ``dataset``'s training split (a ``data.TokenDataset`` with labels).

  AdamW with a cosine-decayed rate over ``steps`` (default ``settings.steps``), batches drawn
  with replacement by ``seed``. Returns ``(apply_fn, params)`` with ``apply_fn(params, tokens)
  -> (features, logits)``.
  """
  _check_dataset(dataset)
  s = settings or ClassifierSettings()
  if steps is not None or seed is not None:
    s = dataclasses.replace(s, steps=int(s.steps if steps is None else steps),
                            seed=int(s.seed if seed is None else seed))
  model = build_classifier(dataset.vocab_size, dataset.train_tokens.shape[1], dataset.num_classes,
                           getattr(dataset, "image_shape", None), s)
  tokens = jnp.asarray(dataset.train_tokens, jnp.int32)
  labels = jnp.asarray(dataset.train_labels, jnp.int32)
  n = tokens.shape[0]
  batch = min(int(s.batch_size), n)
  key = jax.random.key(int(s.seed))
  params = model.init(key, tokens[:1])["params"]
  schedule = optax.cosine_decay_schedule(float(s.lr), int(s.steps))
  tx = optax.adamw(schedule, weight_decay=float(s.weight_decay))
  opt_state = tx.init(params)

  def loss_fn(p, x, y, k):
    _, logits = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": k})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, i):
    p, o = carry
    k = jax.random.fold_in(key, i)
    k_idx, k_drop = jax.random.split(k)
    idx = jax.random.randint(k_idx, (batch,), 0, n)
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens[idx], labels[idx], k_drop)
    updates, o = tx.update(grads, o, p)
    return (optax.apply_updates(p, updates), o), loss

  run = jax.jit(lambda p, o: jax.lax.scan(step, (p, o), jnp.arange(int(s.steps))))
  start = time.time()
  (params, _), losses = run(params, opt_state)
  losses = np.asarray(losses)
  logging.info("Classifier trained: %d steps in %.1f s, final loss %.4f", s.steps, time.time() - start,
               float(losses[-20:].mean()))
  return make_apply_fn(model), params


# ---------------------------------------------------------------------------- cache
def dataset_fingerprint(dataset) -> str:
  """SHA-1 of the training and validation tokens and labels (and the vocabulary size)."""
  h = hashlib.sha1()
  h.update(f"vocab={int(dataset.vocab_size)};classes={int(dataset.num_classes)};".encode())
  for arr in (dataset.train_tokens, dataset.train_labels, dataset.val_tokens, dataset.val_labels):
    if arr is None:
      h.update(b"none")
      continue
    arr = np.ascontiguousarray(np.asarray(arr, np.int32))
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _meta(dataset, settings: ClassifierSettings) -> dict:
  shape = getattr(dataset, "image_shape", None)
  return {"format_version": FORMAT_VERSION, "vocab_size": int(dataset.vocab_size),
          "seq_len": int(dataset.train_tokens.shape[1]), "num_classes": int(dataset.num_classes),
          "image_shape": None if shape is None else [int(v) for v in shape],
          "data_fingerprint": dataset_fingerprint(dataset), "settings": settings.to_json()}


def save_classifier(folder, params, meta: dict) -> str:
  """Writes ``classifier.msgpack`` and ``classifier.json`` (atomically) into ``folder``."""
  folder = os.fspath(folder)
  checkpoints.atomic_write_bytes(os.path.join(folder, PARAMS_FILE),
                                 serialization.to_bytes(jax.device_get(params)))
  checkpoints.atomic_write_bytes(os.path.join(folder, META_FILE),
                                 (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
  return folder


def load_classifier(folder) -> Tuple[Callable, Any, dict]:
  """``(apply_fn, params, meta)`` of a classifier written by ``save_classifier``."""
  folder = os.fspath(folder)
  meta_path, params_path = os.path.join(folder, META_FILE), os.path.join(folder, PARAMS_FILE)
  for p in (meta_path, params_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"classifier file not found: {p}; train one with "
                              "dimo_jax.evaluation.classifier_features.load_or_train_classifier(dataset, folder)")
  with open(meta_path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{meta_path} is not valid JSON ({e}); delete the folder to retrain") from e
  fields = {f.name for f in dataclasses.fields(ClassifierSettings)}
  settings = ClassifierSettings(**{k: (tuple(v) if k == "channels" else v)
                                   for k, v in meta.get("settings", {}).items() if k in fields})
  model = build_classifier(meta["vocab_size"], meta["seq_len"], meta["num_classes"], meta.get("image_shape"),
                           settings)
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, meta["seq_len"]), jnp.int32)))
  target = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), target["params"])
  with open(params_path, "rb") as f:
    try:
      params = serialization.from_bytes(target, f.read())
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{params_path} does not match the classifier described in {meta_path} ({e}); "
                       "delete the folder to retrain") from e
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return make_apply_fn(model), params, meta


def load_or_train_classifier(dataset, folder, *, settings: Optional[ClassifierSettings] = None
                             ) -> Tuple[Callable, Any, dict]:
  """The cached classifier in ``folder`` if it was trained on the same data with the same
  settings; else trains one, measures its validation accuracy and caches it.

  Returns ``(apply_fn, params, meta)``; ``meta`` holds ``val_accuracy``, ``train_accuracy``,
  ``train_seconds`` and ``cached`` (True when read from the folder).
  """
  _check_dataset(dataset)
  settings = settings or ClassifierSettings()
  want = _meta(dataset, settings)
  folder = os.fspath(folder)
  if os.path.isfile(os.path.join(folder, META_FILE)) and os.path.isfile(os.path.join(folder, PARAMS_FILE)):
    try:
      apply_fn, params, meta = load_classifier(folder)
    except (ValueError, KeyError, TypeError) as e:
      logging.warning("Ignoring the classifier cached in %s (%s); retraining.", folder, e)
    else:
      if all(meta.get(k) == v for k, v in want.items()):
        logging.info("Using the classifier cached in %s (val accuracy %.4f).", folder,
                     meta.get("val_accuracy", float("nan")))
        return apply_fn, params, dict(meta, cached=True)
      logging.info("The classifier cached in %s was trained on other data or settings; retraining.", folder)
  start = time.time()
  apply_fn, params = train_classifier(dataset, settings=settings)
  seconds = time.time() - start
  meta = dict(want, train_seconds=round(seconds, 3),
              train_accuracy=accuracy(apply_fn, params, dataset.train_tokens, dataset.train_labels))
  if dataset.val_labels is not None and dataset.val_tokens.shape[0] > 0:
    meta["val_accuracy"] = accuracy(apply_fn, params, dataset.val_tokens, dataset.val_labels)
  else:
    meta["val_accuracy"] = None
  if jax.process_index() == 0:
    save_classifier(folder, params, meta)
  logging.info("Classifier: train accuracy %.4f, val accuracy %s (%.1f s); cached in %s",
               meta["train_accuracy"], meta["val_accuracy"], seconds, folder)
  return apply_fn, params, dict(meta, cached=False)


def settings_from_config(cfg) -> ClassifierSettings:
  """``ClassifierSettings`` from a mapping (e.g. ``config.evaluate.classifier``); unknown keys fail."""
  if cfg is None:
    return ClassifierSettings()
  items = dict(cfg.items()) if hasattr(cfg, "items") else {}
  fields = {f.name for f in dataclasses.fields(ClassifierSettings)}
  unknown = sorted(set(items) - fields)
  if unknown:
    raise ValueError(f"config.evaluate.classifier has unknown field(s) {unknown}; known: {sorted(fields)}")
  if "channels" in items:
    items["channels"] = tuple(int(c) for c in items["channels"])
  return ClassifierSettings(**items)
