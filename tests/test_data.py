"""Tests for dimo_jax.data."""

import os
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dimo_jax.data import batching, datasets, image_grids

# ----------------------------------------------------------------------------
# digits


def test_digits_shapes_range_classes():
  ds = datasets.load_digits()
  assert ds.num_train + ds.num_val == 1797
  assert ds.num_val == round(1797 * 0.1)
  assert ds.train_tokens.shape == (ds.num_train, 64)
  assert ds.train_tokens.dtype == np.int32 and ds.train_labels.dtype == np.int32
  assert ds.vocab_size == 17 and ds.num_classes == 10 and ds.image_shape == (8, 8)
  both = np.concatenate([ds.train_tokens, ds.val_tokens])
  assert both.min() == 0 and both.max() == 16
  assert set(np.unique(np.concatenate([ds.train_labels, ds.val_labels]))) == set(range(10))


def test_digits_tokens_equal_raw_values():
  from sklearn.datasets import load_digits as sk_load
  raw = sk_load().data.astype(np.int32)
  ds = datasets.load_digits(val_fraction=0.0)
  # No validation examples; train keeps the original order.
  assert ds.num_val == 0
  np.testing.assert_array_equal(ds.train_tokens, raw)


def test_digits_other_levels_and_determinism():
  a = datasets.load_digits(levels=4, seed=3)
  b = datasets.load_digits(levels=4, seed=3)
  c = datasets.load_digits(levels=4, seed=4)
  assert a.vocab_size == 4 and a.train_tokens.max() == 3 and a.train_tokens.min() == 0
  np.testing.assert_array_equal(a.train_tokens, b.train_tokens)
  np.testing.assert_array_equal(a.val_labels, b.val_labels)
  assert not np.array_equal(a.val_tokens, c.val_tokens)
  # Value 16 -> top level, value 0 -> 0, 8 -> round(1.5) = 2.
  np.testing.assert_array_equal(datasets.quantize(np.array([0, 8, 16]) / 16, 4), [0, 2, 3])


def test_digits_split_disjoint():
  ds = datasets.load_digits(val_fraction=0.25, seed=1)
  rows = {r.tobytes() for r in ds.train_tokens}
  # Digits has a few duplicate images; nearly all val rows are unseen.
  overlap = sum(r.tobytes() in rows for r in ds.val_tokens)
  assert overlap < 0.05 * ds.num_val
  assert ds.num_val == round(1797 * 0.25)


# ----------------------------------------------------------------------------
# npy


def _save(tmp_path, name, arr):
  p = tmp_path / name
  np.save(p, arr)
  return str(p)


def test_npy_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 7, size=(50, 12)).astype(np.int64)
  toks[0, 0] = 6
  labs = rng.integers(0, 3, size=(50,)).astype(np.uint8)
  labs[0] = 2
  tp, lp = _save(tmp_path, 't.npy', toks), _save(tmp_path, 'l.npy', labs)
  ds = datasets.load_npy(tp, lp, val_fraction=0.2, seed=5, image_shape=(3, 4))
  assert ds.vocab_size == 7 and ds.num_classes == 3 and ds.image_shape == (3, 4)
  assert ds.num_train == 40 and ds.num_val == 10
  assert ds.train_tokens.dtype == np.int32 and ds.val_labels.dtype == np.int32
  # Every (tokens, label) pair of the input appears exactly once.
  got = sorted(r.tobytes() + bytes([int(l)]) for r, l in zip(
      np.concatenate([ds.train_tokens, ds.val_tokens]),
      np.concatenate([ds.train_labels, ds.val_labels])))
  want = sorted(r.astype(np.int32).tobytes() + bytes([int(l)])
                for r, l in zip(toks, labs))
  assert got == want
  ds2 = datasets.load_npy(tp, lp, vocab_size=100, num_classes=5)
  assert ds2.vocab_size == 100 and ds2.num_classes == 5
  ds3 = datasets.load_npy(tp)
  assert ds3.train_labels is None and ds3.num_classes == 0


def test_npy_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npy'):
    datasets.load_npy(str(tmp_path / 'nope.npy'))
  tp = _save(tmp_path, 'tok.npy', np.zeros((4, 3), np.int32))
  with pytest.raises(FileNotFoundError, match='lab_missing.npy'):
    datasets.load_npy(tp, str(tmp_path / 'lab_missing.npy'))


def test_npy_bad_tokens(tmp_path):
  p = _save(tmp_path, 'floaty.npy', np.zeros((4, 3), np.float32))
  with pytest.raises(ValueError, match=r'floaty\.npy.*dtype float32.*integer'):
    datasets.load_npy(p)
  p = _save(tmp_path, 'obj.npy', np.array([[1, 'a']], dtype=object))
  with pytest.raises(ValueError, match=r'obj\.npy.*pickle'):
    datasets.load_npy(p)
  p = _save(tmp_path, 'flat.npy', np.zeros((12,), np.int32))
  with pytest.raises(ValueError, match=r'flat\.npy.*ndim 1'):
    datasets.load_npy(p)
  p = _save(tmp_path, 'cube.npy', np.zeros((2, 3, 4), np.int32))
  with pytest.raises(ValueError, match=r'cube\.npy.*ndim 3'):
    datasets.load_npy(p)
  neg = np.zeros((4, 3), np.int32)
  neg[2, 1] = -5
  p = _save(tmp_path, 'neg.npy', neg)
  with pytest.raises(ValueError, match=r'neg\.npy.*-5 at index \(2, 1\)'):
    datasets.load_npy(p)
  big = np.zeros((4, 3), np.int32)
  big[3, 2] = 9
  p = _save(tmp_path, 'big.npy', big)
  with pytest.raises(ValueError, match=r'big\.npy.*token 9 at index \(3, 2\).*vocab_size=8'):
    datasets.load_npy(p, vocab_size=8)
  assert datasets.load_npy(p, vocab_size=10).vocab_size == 10
  p = _save(tmp_path, 'shape.npy', np.zeros((4, 6), np.int32))
  with pytest.raises(ValueError, match=r'image_shape.*shape\.npy'):
    datasets.load_npy(p, image_shape=(2, 2))


def test_npy_bad_labels(tmp_path):
  tp = _save(tmp_path, 'tok.npy', np.zeros((4, 3), np.int32))
  p = _save(tmp_path, 'short.npy', np.zeros((3,), np.int32))
  with pytest.raises(ValueError, match=r'short\.npy.*3 labels.*4 sequences'):
    datasets.load_npy(tp, p)
  p = _save(tmp_path, 'twod.npy', np.zeros((4, 1), np.int32))
  with pytest.raises(ValueError, match=r'twod\.npy.*ndim 2'):
    datasets.load_npy(tp, p)
  p = _save(tmp_path, 'negl.npy', np.array([0, 1, -1, 0], np.int32))
  with pytest.raises(ValueError, match=r'negl\.npy.*negative label -1 at index 2'):
    datasets.load_npy(tp, p)
  p = _save(tmp_path, 'fl.npy', np.zeros((4,), np.float64))
  with pytest.raises(ValueError, match=r'fl\.npy.*integer'):
    datasets.load_npy(tp, p)
  p = _save(tmp_path, 'toobig.npy', np.array([0, 1, 4, 0], np.int32))
  with pytest.raises(ValueError, match=r'toobig\.npy.*label 4 at index 2.*num_classes=3'):
    datasets.load_npy(tp, p, num_classes=3)
  with pytest.raises(ValueError, match=r'tok\.npy.*no labels'):
    datasets.load_npy(tp, num_classes=3)


# ----------------------------------------------------------------------------
# load_dataset


def test_load_dataset_dispatch(tmp_path):
  cfg = ml_collections.ConfigDict({'name': 'digits', 'levels': 5, 'seed': 2})
  ds = datasets.load_dataset(cfg)
  ref = datasets.load_digits(levels=5, seed=2)
  assert ds.name == 'digits' and ds.vocab_size == 5
  np.testing.assert_array_equal(ds.train_tokens, ref.train_tokens)

  tp = _save(tmp_path, 'tok.npy', np.arange(40, dtype=np.int32).reshape(10, 4) % 6)
  cfg = ml_collections.ConfigDict({
      'name': 'npy', 'path': tp, 'labels': '', 'vocab_size': 0,
      'num_classes': 0, 'image_shape': (2, 2), 'val_fraction': 0.2})
  ds = datasets.load_dataset(cfg)
  assert ds.vocab_size == 6 and ds.num_classes == 0 and ds.image_shape == (2, 2)
  assert ds.num_val == 2

  with pytest.raises(ValueError, match=r"'imagenet'.*digits, npy, tfds"):
    datasets.load_dataset(ml_collections.ConfigDict({'name': 'imagenet'}))
  with pytest.raises(ValueError, match=r'data\.path'):
    datasets.load_dataset({'name': 'npy'})


def test_core_import_does_not_load_tensorflow():
  # Loading digits/npy must not pull TensorFlow in.
  import subprocess
  code = ('import sys; from dimo_jax.data import datasets; datasets.load_digits(); '
          'print("tensorflow" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))), check=True)
  assert out.stdout.strip() == 'False'


# ----------------------------------------------------------------------------
# batch iterator


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_iterator_determinism_and_epochs():
  toks = np.arange(23 * 2, dtype=np.int32).reshape(23, 2)
  labs = np.arange(23, dtype=np.int32)
  a = _take(batching.batch_iterator(toks, labs, 5, seed=7), 12)
  b = _take(batching.batch_iterator(toks, labs, 5, seed=7), 12)
  c = _take(batching.batch_iterator(toks, labs, 5, seed=8), 12)
  for (ta, la), (tb, lb) in zip(a, b):
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(la, lb)
  assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c))
  for t, l in a:
    assert t.shape == (5, 2) and l.shape == (5,)
    np.testing.assert_array_equal(t[:, 0], 2 * l)  # rows stay paired.
  # 23 // 5 = 4 batches per epoch: each epoch has 20 distinct examples.
  for e in range(3):
    epoch = np.concatenate([l for _, l in a[4 * e:4 * e + 4]])
    assert len(set(epoch.tolist())) == 20
  # Epochs are reshuffled.
  assert not np.array_equal(np.concatenate([l for _, l in a[:4]]),
                            np.concatenate([l for _, l in a[4:8]]))


def test_iterator_resume_equivalence():
  toks = np.arange(30, dtype=np.int32).reshape(30, 1)
  full = _take(batching.batch_iterator(toks, None, 4, seed=1), 20)
  for k in (0, 3, 7, 8, 15):
    resumed = _take(batching.batch_iterator(toks, None, 4, seed=1, start_step=k), 20 - k)
    for (t1, l1), (t2, l2) in zip(full[k:], resumed):
      np.testing.assert_array_equal(t1, t2)
      assert l1 is None and l2 is None
    np.testing.assert_array_equal(
        full[k][0][:, 0], batching.batch_indices(30, 4, 1, k))


def test_iterator_host_shards():
  n, bs, shards = 50, 3, 4
  toks = np.arange(n, dtype=np.int32).reshape(n, 1)
  labs = np.arange(n, dtype=np.int32)
  glob = _take(batching.batch_iterator(toks, labs, bs * shards, seed=4), 10)
  per_host = [_take(batching.batch_iterator(toks, labs, bs, seed=4, shard_index=i,
                                        num_shards=shards, start_step=2), 8)
              for i in range(shards)]
  for step in range(8):
    parts = [per_host[i][step][1] for i in range(shards)]
    union = np.concatenate(parts)
    assert len(set(union.tolist())) == bs * shards  # disjoint
    np.testing.assert_array_equal(union, glob[step + 2][1])  # = global batch


def test_iterator_bad_args():
  toks = np.zeros((10, 2), np.int32)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    batching.batch_iterator(toks, None, 4, 0, num_shards=3)
  with pytest.raises(ValueError, match='shard_index'):
    batching.batch_iterator(toks, None, 2, 0, shard_index=2, num_shards=2)
  with pytest.raises(ValueError, match='labels'):
    batching.batch_iterator(toks, np.zeros(9, np.int32), 2, 0)


# ----------------------------------------------------------------------------
# images


def test_tokens_to_images():
  toks = np.array([[0, 4, 8, 16, 17, 3]], np.int32)  # 17 = mask id, clipped.
  img = image_grids.tokens_to_images(toks, 17, (2, 3))
  assert img.shape == (1, 2, 3) and img.dtype == np.float32
  assert img.min() >= 0.0 and img.max() <= 1.0
  np.testing.assert_allclose(img[0, 0], [0, 0.25, 0.5])
  np.testing.assert_allclose(img[0, 1], [1, 1, 3 / 16])
  # Round trip through quantize.
  ds = datasets.load_digits(val_fraction=0.0)
  back = datasets.quantize(image_grids.tokens_to_images(ds.train_tokens[:20], 17, (8, 8)), 17)
  np.testing.assert_array_equal(back.reshape(20, 64), ds.train_tokens[:20])
  with pytest.raises(ValueError, match='image_shape'):
    image_grids.tokens_to_images(toks, 17, (2, 2))


def test_save_image_grid(tmp_path):
  imgs = np.random.default_rng(0).random((5, 3, 4))
  imgs[0] = 0.0
  imgs[0, 0, 0] = 1.0
  path = tmp_path / 'sub' / 'grid.png'
  image_grids.save_image_grid(imgs, str(path), ncols=2, scale=3)
  assert sorted(os.listdir(tmp_path / 'sub')) == ['grid.png']  # no temp left.
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.mode == 'L'
    assert im.size == (2 * 4 * 3, 3 * 3 * 3)  # (width, height)
    arr = np.asarray(im)
  assert arr[0, 0] == 255 and arr[2, 2] == 255 and arr[3, 3] == 0
  expected = np.round(imgs[3] * 255).astype(np.uint8)  # row 1, col 1
  np.testing.assert_array_equal(arr[9:18:3, 12:24:3], expected)
  assert (arr[18:, 12:] == 0).all()  # empty sixth tile.

  rgb = np.random.default_rng(1).random((3, 2, 2, 3))
  image_grids.save_image_grid(rgb, str(path))  # overwrite; default ncols = 2.
  with Image.open(path) as im:
    assert im.mode == 'RGB' and im.size == (2 * 2 * 4, 2 * 2 * 4)
  with pytest.raises(ValueError, match='shape'):
    image_grids.save_image_grid(np.zeros((2, 3)), str(path))


# ----------------------------------------------------------------------------
# tfds (offline, mocked)


def test_tfds_mock_mnist():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    ds = datasets.load_tfds('mnist', levels=4, max_examples=10)
    assert ds.train_tokens.shape == (10, 784) and ds.val_tokens.shape == (10, 784)
    assert ds.image_shape == (28, 28) and ds.vocab_size == 4 and ds.num_classes == 10
    assert ds.train_tokens.min() >= 0 and ds.train_tokens.max() <= 3
    assert len(np.unique(ds.train_tokens)) == 4  # random mock pixels span all levels.
    assert ds.train_labels.shape == (10,) and ds.train_labels.max() < 10

    cfg = ml_collections.ConfigDict({
        'name': 'tfds', 'tfds_name': 'mnist', 'levels': 8,
        'image_shape': (14, 14), 'max_examples': 6})
    ds2 = datasets.load_dataset(cfg)
    assert ds2.train_tokens.shape == (6, 196) and ds2.image_shape == (14, 14)
    assert ds2.train_tokens.max() <= 7


# ----------------------------------------------------------------------------
# Outliers, memory-mapped and broken .npy files


def test_outlier_id_refused_when_the_vocabulary_is_inferred(tmp_path):
  from dimo_jax.storage.checkpoints import UserError
  toks = np.random.default_rng(0).integers(0, 8, size=(20, 6)).astype(np.int64)
  toks[7, 3] = 1_000_000
  p = _save(tmp_path, 'outlier.npy', toks)
  with pytest.raises(UserError) as err:
    datasets.load_npy(p)
  msg = str(err.value)
  assert 'outlier.npy' in msg and '9 distinct ids, but 1000000 (1x)' in msg
  assert '1000001 rows (the rest fit in 8)' in msg and '--config.data.vocab_size=' in msg
  # Stated, the vocabulary is taken as given (the loader reads data.vocab_size).
  cfg = ml_collections.ConfigDict({'name': 'npy', 'path': p, 'vocab_size': 1_000_001})
  assert datasets.load_dataset(cfg).vocab_size == 1_000_001
  # Codes left unused at the top of a table are no outliers.
  sparse = np.tile(np.array([0, 5, 17, 200]), (4, 1))
  assert datasets.load_npy(_save(tmp_path, 'sparse.npy', sparse)).vocab_size == 201


def test_npy_read_block_by_block_equals_whole(tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  toks = rng.integers(0, 50, size=(9, 5)).astype(np.int16)
  toks[6, 4] = 60
  p = _save(tmp_path, 'blocks.npy', toks)
  whole = datasets.load_npy(p)
  arr = datasets._load_int_npy(p, 'Tokens')  # pylint: disable=protected-access
  assert isinstance(arr, np.memmap)  # nothing read until used
  monkeypatch.setattr(datasets, '_CHUNK_ELEMENTS', 7)  # one row per block
  lo, hi, values, counts = datasets._value_stats(arr)  # pylint: disable=protected-access
  want_values, want_counts = np.unique(toks, return_counts=True)
  assert (lo, hi) == (int(toks.min()), 60)
  np.testing.assert_array_equal(values, want_values)
  np.testing.assert_array_equal(counts, want_counts)
  blocked = datasets.load_npy(p)
  np.testing.assert_array_equal(blocked.train_tokens, whole.train_tokens)
  with pytest.raises(ValueError, match=r'token 60 at index \(6, 4\), outside \[0, vocab_size=55\)'):
    datasets.load_npy(p, vocab_size=55)


def test_npy_broken_or_too_big(tmp_path, monkeypatch):
  from dimo_jax.storage import preflight
  from dimo_jax.storage.checkpoints import UserError
  p = _save(tmp_path, 'cut.npy', np.arange(60, dtype=np.int32).reshape(10, 6))
  with open(p, 'r+b') as f:
    f.truncate(os.path.getsize(p) - 40)
  with pytest.raises(UserError, match=r"cut\.npy' is not a valid \.npy array .*truncated or corrupt"):
    datasets.load_npy(p)
  junk = tmp_path / 'junk.npy'
  junk.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': 5}   \n")
  with pytest.raises(UserError, match=r"junk\.npy' is not a valid \.npy array"):
    datasets.load_npy(str(junk))
  # A 200 GB sparse file: refused from its header, before a byte of it is read.
  huge = str(tmp_path / 'huge.npy')
  shape = (200 * 2**30 // (4 * 1024), 1024)
  with open(huge, 'wb') as f:
    np.lib.format.write_array_header_1_0(f, {'descr': '<i4', 'fortran_order': False, 'shape': shape})
    try:
      f.truncate(f.tell() + shape[0] * shape[1] * 4)
    except OSError:
      pytest.skip('this file system cannot hold a 200 GB sparse file')
  monkeypatch.setattr(preflight, 'available_memory', lambda: 24 * 2**30)
  monkeypatch.setattr(datasets, '_value_stats', lambda a: pytest.fail('the data was scanned'))
  try:
    with pytest.raises(UserError, match=r"huge\.npy' \(52428800 x 1024 tokens, read as int32 and split\) needs "
                       r'400\.0 GiB of memory but 24\.0 GiB is available; use a smaller file'):
      datasets.load_npy(huge)
  finally:
    os.remove(huge)


def test_cli_outlier_tokens_exit_2(tmp_path):
  import subprocess
  toks = np.random.default_rng(0).integers(0, 8, size=(20, 6)).astype(np.int64)
  toks[3, 1] = 1_000_000
  p = _save(tmp_path, 'outlier.npy', toks)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'dimo_jax.main', '--config=configs/tokens.py',
                         f'--workdir={tmp_path / "run"}', f'--config.data.path={p}', '--config.mode=teacher'],
                        capture_output=True, text=True, cwd=root, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert 'outlier.npy' in proc.stderr and '1000000 (1x)' in proc.stderr and '--config.data.vocab_size' in proc.stderr
