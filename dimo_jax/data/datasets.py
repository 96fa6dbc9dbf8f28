"""Discrete token datasets: the sources, their checks and the train / validation split.

A dataset is a set of token sequences ``tokens`` int32 [N, L] with values in
[0, vocab_size) and optional class ``labels`` int32 [N] in [0, num_classes).
The mask id (``vocab_size``) never occurs in data.

Sources:
  * ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes),
    quantised to ``levels`` grey levels (17 levels keep the raw values 0..16).
  * ``npy``: a user-supplied integer ``.npy`` array [N, L] (+ optional labels).
  * ``tfds``: a TensorFlow Datasets image dataset, converted to grey,
    optionally resized, quantised and flattened (TensorFlow imported lazily).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Tuple

import numpy as np

from dimo_jax.storage import preflight
from dimo_jax.storage.checkpoints import UserError

VALID_NAMES = ('digits', 'npy', 'tfds')

# ITU-R BT.601 luma weights for RGB -> grey.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenDataset:
  """Train / validation token sequences with optional class labels."""

  train_tokens: np.ndarray  # int32 [N, L]
  train_labels: Optional[np.ndarray]  # int32 [N] or None
  val_tokens: np.ndarray  # int32 [M, L]
  val_labels: Optional[np.ndarray]  # int32 [M] or None
  vocab_size: int
  num_classes: int  # 0 when unconditional
  image_shape: Optional[Tuple[int, int]]  # (H, W) for raster grey images
  name: str

  def __post_init__(self):
    for split in ('train', 'val'):
      tokens = getattr(self, f'{split}_tokens')
      labels = getattr(self, f'{split}_labels')
      if tokens.ndim != 2:
        raise ValueError(f'{self.name}: {split}_tokens must be [N, L], got '
                         f'shape {tokens.shape}.')
      if labels is not None and labels.shape != (tokens.shape[0],):
        raise ValueError(f'{self.name}: {split}_labels must have shape '
                         f'({tokens.shape[0]},), got {labels.shape}.')
    if self.train_tokens.shape[1] != self.val_tokens.shape[1]:
      raise ValueError(f'{self.name}: train and val sequence lengths differ '
                       f'({self.train_tokens.shape[1]} vs '
                       f'{self.val_tokens.shape[1]}).')
    if self.image_shape is not None:
      h, w = self.image_shape
      if h * w != self.seq_len:
        raise ValueError(f'{self.name}: image_shape {tuple(self.image_shape)} '
                         f'has {h * w} pixels but sequences have length '
                         f'{self.seq_len}.')

  @property
  def seq_len(self) -> int:
    return int(self.train_tokens.shape[1])

  @property
  def num_train(self) -> int:
    return int(self.train_tokens.shape[0])

  @property
  def num_val(self) -> int:
    return int(self.val_tokens.shape[0])


# ----------------------------------------------------------------------------
# Helpers.


def quantize(x: np.ndarray, levels: int) -> np.ndarray:
  """Maps values in [0, 1] to int32 tokens in [0, levels) (nearest level).

  Token t stands for the grey value t / (levels - 1), the inverse used by
  `tokens_to_images`.
  """
  _check_levels(levels)
  x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
  q = np.floor(x * (levels - 1) + 0.5)
  return np.clip(q, 0, levels - 1).astype(np.int32)


def _check_levels(levels: int) -> None:
  if int(levels) != levels or levels < 2:
    raise ValueError(f'levels must be an integer >= 2, got {levels!r}.')


def _check_val_fraction(val_fraction: float) -> None:
  if not 0.0 <= float(val_fraction) < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction!r}.')


def _split(tokens: np.ndarray, labels: Optional[np.ndarray],
           val_fraction: float, seed: int):
  """Deterministic random train/val split (validation gets round(N*f))."""
  _check_val_fraction(val_fraction)
  n = tokens.shape[0]
  n_val = int(round(n * float(val_fraction)))
  if val_fraction > 0:
    n_val = max(1, n_val)
  n_val = min(n_val, n - 1)
  perm = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  pick = lambda a, i: None if a is None else np.ascontiguousarray(a[i])
  return (pick(tokens, train_idx), pick(labels, train_idx),
          pick(tokens, val_idx), pick(labels, val_idx))


def _normalize_image_shape(image_shape, what: str = 'image_shape'):
  if image_shape is None:
    return None
  try:
    shape = tuple(int(s) for s in image_shape)
  except TypeError as e:
    raise ValueError(f'{what} must be a pair (H, W) or None, got '
                     f'{image_shape!r}.') from e
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f'{what} must be a pair of positive ints (H, W), got '
                     f'{image_shape!r}.')
  return shape


# ----------------------------------------------------------------------------
# Sources.


def load_digits(levels: int = 17, val_fraction: float = 0.1,
                seed: int = 0) -> TokenDataset:
  """scikit-learn's 8x8 digits as 64 tokens with `levels` grey levels."""
  _check_levels(levels)
  from sklearn import datasets as sk_datasets  # bundled, no download.

  bunch = sk_datasets.load_digits()
  values = np.asarray(bunch.data).astype(np.int64)  # [1797, 64] in 0..16
  if levels == 17:
    tokens = values.astype(np.int32)
  else:
    tokens = quantize(values / 16.0, levels)
  labels = np.asarray(bunch.target).astype(np.int32)
  tr_t, tr_l, va_t, va_l = _split(tokens, labels, val_fraction, seed)
  return TokenDataset(tr_t, tr_l, va_t, va_l, vocab_size=int(levels),
                      num_classes=10, image_shape=(8, 8), name='digits')


def _load_int_npy(path: str, what: str) -> np.ndarray:
  """np.load without pickle, memory-mapped (nothing is read until used); the array must hold
  integers."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(
        f'{what} path {path!r} is a directory, not a .npy file. Point '
        f'data.path / data.labels in the config at the file inside it.')
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{what} file not found: {path!r}. Check the path (data.path / '
        f'data.labels in the config).')
  with open(path, 'rb') as f:
    head = f.read(6)
  if head != b'\x93NUMPY' and not head.startswith(b'PK'):
    kind = 'a text file' if head and all(32 <= b < 127 or b in b'\t\r\n' for b in head) else 'another format'
    raise ValueError(
        f'{what} file {path!r} is not a NumPy .npy file (it starts with {head!r}: '
        f'{kind}). Save the array with np.save(path, arr.astype(np.int32)).')
  try:
    arr = np.load(path, mmap_mode='r', allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except  # NumPy's header parser raises many types
    raise UserError(
        f'{what} file {path!r} is not a valid .npy array ({type(e).__name__}: '
        f'{str(e)[:160]}); a truncated or corrupt file, or one that needs pickle. Save a plain '
        f'integer array with np.save(path, arr.astype(np.int32)).') from None
  if not isinstance(arr, np.ndarray):  # e.g. an .npz archive.
    if hasattr(arr, 'close'):
      arr.close()
    raise ValueError(f'{what} file {path!r} is not a single .npy array (got '
                     f'{type(arr).__name__}). Save one array with np.save.')
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f'{what} file {path!r} has dtype {arr.dtype}, expected an integer '
        f'array. Convert it, e.g. np.save(path, arr.astype(np.int32)).')
  return arr


def _first_where(mask: np.ndarray) -> Tuple[int, ...]:
  return tuple(int(i) for i in np.argwhere(mask)[0])


_CHUNK_ELEMENTS = 2**24


def _row_chunks(array: np.ndarray):
  """``(first row, rows)`` blocks of about ``_CHUNK_ELEMENTS`` values (a memory-mapped array is
  read block by block)."""
  rows = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(array.shape[1:], dtype=np.int64))))
  for start in range(0, array.shape[0], rows):
    yield start, np.asarray(array[start:start + rows])


def _first_match(array: np.ndarray, test) -> Tuple[int, ...]:
  """The index of the first value of ``array`` where ``test(block)`` holds."""
  for start, block in _row_chunks(array):
    mask = test(block)
    if mask.any():
      where = _first_where(mask)
      return (start + where[0],) + where[1:]
  raise AssertionError('no value matches')


def _value_stats(array: np.ndarray) -> Tuple[int, int, np.ndarray, np.ndarray]:
  """(min, max, distinct values, their counts) of an integer array, read block by block."""
  values, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
  for _, block in _row_chunks(array):
    if block.dtype == np.uint64:  # beyond any vocabulary anyway: kept >= 2**62 rather than wrapped negative
      block = np.minimum(block, np.uint64(2**62))
    v, c = np.unique(block.astype(np.int64, copy=False), return_counts=True)
    values, where = np.unique(np.concatenate([values, v]), return_inverse=True)
    counts = np.bincount(where, weights=np.concatenate([counts, c]), minlength=len(values)).astype(np.int64)
  return int(values[0]), int(values[-1]), values, counts


# A largest id beyond this many times the distinct values (plus a margin) is taken for an outlier
# when the vocabulary is inferred: one stray 1,000,000 among ids below 8 would make a 1,000,001-row
# embedding table.
OUTLIER_FACTOR = 4
OUTLIER_MARGIN = 256


def infer_vocab_size(values: np.ndarray, counts: np.ndarray, path: str) -> int:
  """``max + 1`` of the distinct token ``values`` (sorted, with their ``counts``), refusing ids far
  beyond the number of distinct values (see ``OUTLIER_FACTOR``) with a ``UserError`` naming them."""
  limit = OUTLIER_FACTOR * len(values) + OUTLIER_MARGIN
  if int(values[-1]) < limit:
    return int(values[-1]) + 1
  far = values >= limit
  shown = ', '.join(f'{int(v)} ({int(c)}x)' for v, c in zip(values[far][:5], counts[far][:5]))
  more = f' and {int(far.sum()) - 5} more' if far.sum() > 5 else ''
  below = int(values[~far][-1]) + 1 if (~far).any() else 0
  raise UserError(
      f'Tokens file {path!r}: {len(values)} distinct ids, but {shown}{more} lie far beyond them: '
      f'an inferred vocabulary would have {int(values[-1]) + 1} rows (the rest fit in {below}). '
      f'Fix or drop those sequences, or state the vocabulary with --config.data.vocab_size=<rows>.')


def load_npy(path: str, labels_path: Optional[str] = None,
             vocab_size: Optional[int] = None, val_fraction: float = 0.1,
             seed: int = 0, image_shape=None,
             num_classes: Optional[int] = None) -> TokenDataset:
  """Loads tokens [N, L] (and labels [N]) from `.npy` files.

  The files are memory-mapped and scanned block by block; the int32 copy and the split must fit
  in memory (``preflight.check_free_memory``). vocab_size: None or 0 infers tokens.max() + 1,
  refusing outlier ids far beyond the distinct values (``infer_vocab_size``). num_classes: None or 0
  infers labels.max() + 1 when labels are given; without labels it must be
  None or 0 (unconditional).
  """
  path = os.fspath(path)
  tokens = _load_int_npy(path, 'Tokens')
  if tokens.ndim != 2:
    raise ValueError(f'Tokens file {path!r} holds an array of shape '
                     f'{tokens.shape} (ndim {tokens.ndim}); expected ndim 2 '
                     f'[N, L]. Reshape it, e.g. arr.reshape(len(arr), -1).')
  if tokens.shape[0] < 2 or tokens.shape[1] < 1:
    raise ValueError(f'Tokens file {path!r} has shape {tokens.shape}; need at '
                     f'least 2 sequences of length >= 1.')
  n, length = (int(d) for d in tokens.shape)
  preflight.check_free_memory(
      2 * n * length * 4, f'Tokens file {path!r} ({n} x {length} tokens, read as int32 and split)',
      'use a smaller file (a slice of the sequences) or a machine with more memory')
  min_token, max_token, values, counts = _value_stats(tokens)
  if min_token < 0:
    where = _first_match(tokens, lambda b: b < 0)
    raise ValueError(f'Tokens file {path!r} has negative token '
                     f'{int(tokens[where])} at index {where}; tokens must be '
                     f'in [0, vocab_size).')
  if not vocab_size:
    vocab_size = infer_vocab_size(values, counts, path)
  vocab_size = int(vocab_size)
  if vocab_size < 1 or vocab_size >= 2**31 - 1:
    raise ValueError(f'vocab_size must be in [1, 2**31 - 1), got {vocab_size} '
                     f'(for {path!r}).')
  if max_token >= vocab_size:
    where = _first_match(tokens, lambda b: b >= vocab_size)
    raise ValueError(
        f'Tokens file {path!r} has token {int(tokens[where])} at index {where}'
        f', outside [0, vocab_size={vocab_size}). Raise vocab_size to at least '
        f'{max_token + 1} (0 infers it) or fix the data.')
  tokens = np.asarray(tokens, dtype=np.int32)

  labels = None
  if labels_path:
    labels_path = os.fspath(labels_path)
    labels = _load_int_npy(labels_path, 'Labels')
    if labels.ndim != 1:
      raise ValueError(f'Labels file {labels_path!r} has shape {labels.shape} '
                       f'(ndim {labels.ndim}); expected ndim 1 [N]. Flatten '
                       f'it, e.g. labels.reshape(-1).')
    if labels.shape[0] != tokens.shape[0]:
      raise ValueError(
          f'Labels file {labels_path!r} has {labels.shape[0]} labels but '
          f'tokens file {path!r} has {tokens.shape[0]} sequences; they must '
          f'match one label per sequence.')
    if labels.min() < 0:
      where = int(np.argmax(labels < 0))
      raise ValueError(f'Labels file {labels_path!r} has negative label '
                       f'{int(labels[where])} at index {where}; labels must be '
                       f'in [0, num_classes).')
    max_label = int(labels.max())
    if not num_classes or num_classes < 0:
      num_classes = max_label + 1
    num_classes = int(num_classes)
    if max_label >= num_classes:
      where = int(np.argmax(labels >= num_classes))
      raise ValueError(
          f'Labels file {labels_path!r} has label {int(labels[where])} at '
          f'index {where}, outside [0, num_classes={num_classes}). Raise '
          f'num_classes to at least {max_label + 1} (0 infers it).')
    labels = labels.astype(np.int32)
  else:
    if num_classes and num_classes > 0:
      raise ValueError(
          f'num_classes={num_classes} was given for {path!r} but no labels '
          f'file; give a labels file or set num_classes to 0 (unconditional).')
    num_classes = 0

  shape = _normalize_image_shape(image_shape)
  if shape is not None and shape[0] * shape[1] != tokens.shape[1]:
    raise ValueError(f'image_shape {shape} has {shape[0] * shape[1]} pixels '
                     f'but sequences in {path!r} have length '
                     f'{tokens.shape[1]}; fix image_shape or set it to None.')
  tr_t, tr_l, va_t, va_l = _split(tokens, labels, val_fraction, seed)
  return TokenDataset(tr_t, tr_l, va_t, va_l, vocab_size=vocab_size,
                      num_classes=int(num_classes), image_shape=shape,
                      name=f'npy:{os.path.basename(path)}')


def load_tfds(name: str, levels: int, split: str = 'train',
              val_split: Optional[str] = 'test', data_dir: Optional[str] = None,
              resize=None, max_examples: Optional[int] = None) -> TokenDataset:
  """A TFDS image dataset as grey-level tokens.

  Images are converted to grey (BT.601 luma), optionally resized to
  `resize` = (H, W) with antialiasing, quantised to `levels` levels and
  flattened row-major. `max_examples` caps each split. `val_split` None
  gives an empty validation set.
  """
  _check_levels(levels)
  resize = _normalize_image_shape(resize, 'resize')
  if max_examples is not None and int(max_examples) < 1:
    max_examples = None
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def grey_batch(batch):
    img = tf.cast(batch['image'], tf.float32) / 255.0  # [B, H, W, C]
    channels = img.shape[-1]
    if channels == 3:
      img = tf.tensordot(img, tf.constant(_LUMA), axes=[[-1], [0]])[..., None]
    elif channels == 4:
      img = tf.tensordot(img[..., :3], tf.constant(_LUMA),
                         axes=[[-1], [0]])[..., None]
    elif channels != 1:
      raise ValueError(f'TFDS dataset {name!r}: images with {channels} '
                       f'channels are not supported (need 1, 3 or 4).')
    if resize is not None:
      img = tf.image.resize(img, resize, method='bilinear', antialias=True)
    out = {'image': img[..., 0]}
    if 'label' in batch:
      out['label'] = batch['label']
    return out

  def load_split(split_name):
    try:
      ds, info = tfds.load(name, split=split_name, data_dir=data_dir,
                           with_info=True, shuffle_files=False)
    except Exception as e:  # Report the name/split; tfds errors are long.
      raise ValueError(
          f'Could not load TFDS dataset {name!r} split {split_name!r} '
          f'(data_dir={data_dir!r}): {e}. Check data.tfds_name / '
          f'data.tfds_data_dir, or prepare the dataset with `tfds build` '
          f'first.') from e
    if 'image' not in info.features:
      raise ValueError(f'TFDS dataset {name!r} has no "image" feature '
                       f'(features: {list(info.features.keys())}).')
    if max_examples is not None:
      ds = ds.take(int(max_examples))
    ds = ds.batch(1024).map(grey_batch)
    images, labels = [], []
    for batch in tfds.as_numpy(ds):
      images.append(quantize(batch['image'], levels))
      if 'label' in batch:
        labels.append(np.asarray(batch['label']).astype(np.int32))
    if not images:
      raise ValueError(f'TFDS dataset {name!r} split {split_name!r} is empty.')
    img = np.concatenate(images)
    lab = np.concatenate(labels) if labels else None
    num_classes = 0
    if lab is not None and hasattr(info.features['label'], 'num_classes'):
      num_classes = int(info.features['label'].num_classes)
    return img, lab, num_classes

  tr_img, tr_lab, num_classes = load_split(split)
  image_shape = tuple(int(s) for s in tr_img.shape[1:3])
  tr_tokens = tr_img.reshape(tr_img.shape[0], -1)
  if val_split:
    va_img, va_lab, _ = load_split(val_split)
    va_tokens = va_img.reshape(va_img.shape[0], -1)
  else:
    va_tokens = np.zeros((0, tr_tokens.shape[1]), np.int32)
    va_lab = None if tr_lab is None else np.zeros((0,), np.int32)
  if tr_lab is not None and num_classes == 0:
    num_classes = int(tr_lab.max()) + 1
  return TokenDataset(tr_tokens, tr_lab, va_tokens, va_lab,
                      vocab_size=int(levels), num_classes=num_classes,
                      image_shape=image_shape, name=f'tfds:{name}')


def load_dataset(data_config: Any) -> TokenDataset:
  """Builds a dataset from a config (ConfigDict or dict); missing fields default.

  Fields: name in {'digits', 'npy', 'tfds'}, path, labels, vocab_size (0/None
  = infer), num_classes, levels, val_fraction, seed, tfds_name, tfds_data_dir,
  tfds_split, tfds_val_split, image_shape (for tfds: the resize target),
  max_examples.
  """
  get = data_config.get
  name = get('name', 'digits')
  val_fraction = get('val_fraction', 0.1)
  val_fraction = 0.1 if val_fraction is None else float(val_fraction)
  seed = int(get('seed', 0) or 0)
  if name == 'digits':
    return load_digits(levels=int(get('levels', 17) or 17),
                       val_fraction=val_fraction, seed=seed)
  if name == 'npy':
    path = get('path', None)
    if not path:
      raise ValueError('data.name is "npy" but data.path is empty; set '
                       'data.path to a .npy file of int tokens [N, L].')
    return load_npy(path, labels_path=get('labels', None) or None,
                    vocab_size=get('vocab_size', None) or None,
                    val_fraction=val_fraction, seed=seed,
                    image_shape=get('image_shape', None),
                    num_classes=get('num_classes', None) or None)
  if name == 'tfds':
    tfds_name = get('tfds_name', None)
    if not tfds_name:
      raise ValueError('data.name is "tfds" but data.tfds_name is empty; set '
                       'it, e.g. "mnist" or "cifar10".')
    return load_tfds(tfds_name, levels=int(get('levels', 256) or 256),
                     split=get('tfds_split', 'train') or 'train',
                     val_split=get('tfds_val_split', 'test'),
                     data_dir=get('tfds_data_dir', None) or None,
                     resize=get('image_shape', None),
                     max_examples=get('max_examples', None) or None)
  raise ValueError(f'Unknown data.name {name!r}; valid names: '
                   f'{", ".join(VALID_NAMES)}.')
