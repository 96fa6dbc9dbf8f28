"""A file of prompt conditions computed once: every prompt's text-encoder output kept in an
``.npz`` beside a fingerprint of what it was computed from (the prompt file, the tokenizer and
the encoder's weights); a cache whose fingerprint differs stops with what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any, Callable, Dict

import numpy as np
from absl import logging

CACHE_FORMAT = 1


def file_sha1(path: str) -> str:
  """The SHA-1 of a file's bytes (hex)."""
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def cache_fingerprint(prompts_path: str, tokenizer, encoder_fingerprint: str) -> Dict[str, Any]:
  """What a condition cache depends on: the prompt file, the tokenizer and the encoder's weights
  (``encoder_fingerprint``, e.g. ``evaluation.sample_sets.params_fingerprint`` of them)."""
  return {"format": CACHE_FORMAT, "prompts_sha1": file_sha1(prompts_path), "tokenizer": str(tokenizer.source),
          "tokenizer_vocab": int(tokenizer.vocab_size), "max_length": int(tokenizer.max_length),
          "text_encoder": str(encoder_fingerprint)}


def read_cache(path: str, fingerprint: Dict[str, Any], key: str) -> Dict[str, np.ndarray]:
  """The ``{"text", "pooled"}`` arrays of the cache ``path`` after checking that its fingerprint is
  ``fingerprint``; a truncated or foreign file, or one without a fingerprint, is one ``ValueError``
  line naming ``key``, the file and the fix (delete it: the run writes it again)."""
  fix = f"delete it (the run computes it again) or point --{key} to a new file"
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = sorted({"fingerprint", "text", "pooled"} - set(f.files))
      if missing:
        raise ValueError(f"{key}={path} is not a condition cache of this project (no {', '.join(missing)} "
                         f"entry); {fix}")
      stored = json.loads(str(f["fingerprint"]))
      if not isinstance(stored, dict):
        raise ValueError(f"{key}={path} has an unreadable fingerprint; {fix}")
      diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
      if diff:
        what = ", ".join(f"{k}: {stored.get(k)} != {fingerprint.get(k)}" for k in diff)
        raise ValueError(f"{key}={path} was written for another {', '.join(diff)} than this run's ({what}); {fix}")
      return {"text": np.asarray(f["text"]), "pooled": np.asarray(f["pooled"])}
  except (zipfile.BadZipFile, EOFError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{key}={path} is damaged (truncated or not an .npz file: {e}); {fix}") from None
  except ValueError as e:
    if str(e).startswith(f"{key}="):
      raise
    raise ValueError(f"{key}={path} is damaged ({e}); {fix}") from None


def load_or_build_cache(path: str, fingerprint: Dict[str, Any], build: Callable[[], Dict[str, np.ndarray]],
                        key: str = "config.distill.text_cache") -> Dict[str, np.ndarray]:
  """The cached conditions (``{"text", "pooled"}``) of every prompt; built with ``build()`` and
  written atomically when ``path`` does not exist. ``key``: the config key that named ``path``."""
  if os.path.exists(path):
    return read_cache(path, fingerprint, key)
  table = build()
  tmp = path + ".tmp.npz"
  np.savez(tmp, text=table["text"], pooled=table["pooled"], fingerprint=json.dumps(fingerprint, sort_keys=True))
  os.replace(tmp, path)
  logging.info("Cached the conditions of %d prompts in %s.", len(table["pooled"]), path)
  return table
