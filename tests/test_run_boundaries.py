"""Checks at the run path's file boundaries: the text-condition cache, the text-to-image export's
``settings.json``, the readers of a stored run, the write targets of every mode."""
import json
import os

import numpy as np
import pytest

from dimo_jax.data import prompt_cache

FP = {"format": 1, "prompts_sha1": "ab", "tokenizer": "t", "tokenizer_vocab": 9, "max_length": 4, "text_encoder": "e"}


def _table():
  return {"text": np.ones((2, 4, 3), np.float32), "pooled": np.zeros((2, 3), np.float32)}


def test_a_damaged_condition_cache_is_one_line_saying_to_delete_it(tmp_path):
  path = str(tmp_path / "cache.npz")
  built = prompt_cache.load_or_build_cache(path, FP, _table)
  again = prompt_cache.load_or_build_cache(path, FP, lambda: pytest.fail("the cache was not read back"))
  np.testing.assert_array_equal(again["text"], built["text"])
  with pytest.raises(ValueError, match=r"was written for another text_encoder than this run's"):
    prompt_cache.load_or_build_cache(path, dict(FP, text_encoder="other"), _table)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError) as e:
    prompt_cache.load_or_build_cache(path, FP, _table)
  msg = str(e.value)
  assert msg.startswith(f"config.distill.text_cache={path} is damaged (truncated") and "delete it" in msg
  assert len(msg.splitlines()) == 1
  np.savez(path, **_table())  # no fingerprint
  with pytest.raises(ValueError) as e:
    prompt_cache.load_or_build_cache(path, FP, _table, key="config.sample.text_cache")
  assert str(e.value) == (f"config.sample.text_cache={path} is not a condition cache of this project (no fingerprint "
                          "entry); delete it (the run computes it again) or point --config.sample.text_cache to a "
                          "new file")
  os.remove(path)
  prompt_cache.load_or_build_cache(path, FP, _table)  # deleted: written again
  assert json.loads(str(np.load(path)["fingerprint"])) == FP
