import dataclasses
import json
import os
import time

import jax
import numpy as np
import pytest

from dimo_jax.data import datasets
from dimo_jax.evaluation import classifier_features
from dimo_jax.networks import classifier


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits()


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
  folder = tmp_path_factory.mktemp("clf")
  start = time.time()
  apply_fn, params, meta = classifier_features.load_or_train_classifier(
      digits, str(folder), settings=classifier.ClassifierSettings(steps=300))
  return folder, apply_fn, params, meta, time.time() - start


def test_digits_accuracy_and_speed(digits, trained):
  _, apply_fn, params, meta, seconds = trained
  assert meta["val_accuracy"] > 0.9 and not meta["cached"]
  assert seconds < 60
  assert meta["val_accuracy"] == classifier_features.accuracy(apply_fn, params, digits.val_tokens, digits.val_labels)
  feats, logits = classifier_features.predict(apply_fn, params, digits.val_tokens[:5])
  assert feats.shape == (5, 128) and logits.shape == (5, 10)
  assert feats.min() >= 0.0  # post-ReLU features


def test_predict_batching_invariant(digits, trained):
  _, apply_fn, params, _, _ = trained
  tokens = digits.val_tokens[:37]
  f1, l1 = classifier_features.predict(apply_fn, params, tokens, batch_size=16)
  f2, l2 = classifier_features.predict(apply_fn, params, tokens, batch_size=64)
  np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)


def test_cache_reused_and_invalidated(digits, trained):
  folder, _, params, meta, _ = trained
  assert sorted(os.listdir(folder)) == ["classifier.json", "classifier.msgpack"]
  with open(os.path.join(folder, "classifier.json")) as f:
    stored = json.load(f)
  assert stored["data_fingerprint"] == classifier_features.dataset_fingerprint(digits)
  assert stored["settings"]["steps"] == 300
  mtime = os.stat(os.path.join(folder, "classifier.msgpack")).st_mtime_ns
  _, params2, meta2 = classifier_features.load_or_train_classifier(
      digits, str(folder), settings=classifier.ClassifierSettings(steps=300))
  assert meta2["cached"] and meta2["val_accuracy"] == meta["val_accuracy"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  assert os.stat(os.path.join(folder, "classifier.msgpack")).st_mtime_ns == mtime
  # Other data -> a different fingerprint -> retrained.
  other = dataclasses.replace(digits, train_labels=(digits.train_labels + 1) % 10)
  assert classifier_features.dataset_fingerprint(other) != classifier_features.dataset_fingerprint(digits)


def test_synthetic_separable(tmp_path):
  rng = np.random.default_rng(0)
  n, length = 200, 16
  labels = (np.arange(n) % 2).astype(np.int32)
  tokens = rng.integers(0, 3, size=(n, length)).astype(np.int32)
  tokens[:, 5] = 3 * labels  # the class is written at position 5
  ds = datasets.TokenDataset(tokens[:160], labels[:160], tokens[160:], labels[160:], vocab_size=4, num_classes=2,
                         image_shape=(4, 4), name="sep")
  s = classifier.ClassifierSettings(steps=60, channels=(32,), feature_dim=16)
  fn, params = classifier_features.train_classifier(ds, settings=s)
  assert classifier_features.accuracy(fn, params, ds.val_tokens, ds.val_labels) == 1.0


def test_conv_shapes():
  model = classifier.build_classifier(4, 16, 3, (4, 4), classifier.ClassifierSettings(arch="conv", channels=(8, 8),
                                                                                      feature_dim=12))
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), np.zeros((2, 16), np.int32))[0])
  assert out[0].shape == (2, 12) and out[1].shape == (2, 3)


def test_bad_input_fails(digits):
  unlabelled = dataclasses.replace(digits, train_labels=None, val_labels=None, num_classes=0)
  with pytest.raises(ValueError, match="no class labels"):
    classifier_features.train_classifier(unlabelled, steps=1)
  with pytest.raises(ValueError, match="conv"):
    classifier.build_classifier(17, 64, 10, None, classifier.ClassifierSettings(arch="conv"))
  with pytest.raises(ValueError, match="arch"):
    classifier.ClassifierSettings(arch="resnet")
  with pytest.raises(ValueError, match="unknown field"):
    classifier_features.settings_from_config({"stepz": 3})
  with pytest.raises(FileNotFoundError, match="classifier.json"):
    classifier_features.load_classifier("/nonexistent/folder")
