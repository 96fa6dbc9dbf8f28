"""Prompts and the CLIP tokenizer, from files the user brings (nothing is downloaded).

``load_tokenizer(folder)`` reads Meissonic's ``tokenizer/`` folder: the CLIP byte-level BPE
``vocab.json`` + ``merges.txt`` (what transformers' ``CLIPTokenizer`` reads), or else a
``tokenizer.json``; ``special_tokens_map.json`` (then ``tokenizer_config.json``) names the pad
token. Passing the Meissonic folder that holds ``tokenizer/`` works as well. Tokenisation runs on
the ``tokenizers`` library:

- text: NFC, every run of whitespace -> one space, lower case (CLIP's ``whitespace_clean`` and
  ``lower``; ftfy's mojibake repair is not applied);
- words: CLIP's pattern (contractions ``'s 't 're 've 'm 'll 'd``, letter runs, single digits,
  runs of other non-space characters), then bytes -> unicode as GPT-2, then BPE with ``</w>`` ending
  each word;
- ``encode(prompts)`` -> int32 ``[B, 77]``: ``<|startoftext|>`` (49406), at most 75 prompt tokens,
  ``<|endoftext|>`` (49407), then the pad token up to 77 (``padding="max_length"``,
  ``truncation=True``: a long prompt is cut and still ends with the end-of-text token). The pad
  token is the one ``special_tokens_map.json`` names, else ``<|endoftext|>`` (laion's choice).
  No attention mask is returned: Meissonic feeds every position to both networks.

``read_prompts(path)`` reads one prompt per line. Every file is read as UTF-8 (a byte-order mark
dropped) by ``storage.text_files``; bytes that are not UTF-8 are reported with the file's name.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from dimo_jax.storage import text_files
from dimo_jax.storage.checkpoints import UserError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
MAX_PROMPT_CHARS = 1000
# CLIP's word pattern (special tokens are split off before it as added tokens).
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_HINT = ("pass the tokenizer/ folder of the Meissonic release (vocab.json + merges.txt, or "
         "tokenizer.json; special_tokens_map.json names the pad token)")


def _special_content(value: Any) -> Optional[str]:
  """A special-token entry (a string or ``{"content": ...}``) -> its text."""
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _read_json(path: str) -> Any:
  return text_files.read_json(path, _HINT)


def _check_vocab(vocab: Any, path: str) -> Dict[str, int]:
  """``vocab.json``'s object when every id is a distinct integer >= 0; else ``UserError`` naming
  the token and its id."""
  if not isinstance(vocab, dict) or not vocab:
    raise UserError(f"{path}: expected a JSON object mapping tokens to ids; {_HINT}.")
  seen: Dict[int, str] = {}
  for token, i in vocab.items():
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 2**31:
      raise UserError(f"{path}: token {token!r} has id {json.dumps(i)[:40]}, not an integer in [0, 2**31); "
                      f"the file is corrupt or not a CLIP vocabulary; {_HINT}.")
    if i in seen:
      raise UserError(f"{path}: tokens {seen[i]!r} and {token!r} share the id {i}; {_HINT}.")
    seen[i] = token
  return vocab


def _read_merges(path: str, vocab: Dict[str, int]) -> List[Tuple[str, str]]:
  """Merge pairs of ``merges.txt`` (no ``#version`` header) whose parts and result are in the vocab.

  transformers' CLIPTokenizer keeps only the merges of the released vocabulary; keeping the merges
  whose tokens exist is the same for the released files.
  """
  merges = []
  for n, line in enumerate(text_files.read_lines(path, _HINT), 1):
    if not line or line.startswith("#version"):
      continue
    parts = line.split()
    if len(parts) != 2:
      raise UserError(f"{path}, line {n}: expected two tokens separated by a space, got "
                      f"{line[:80]!r}; {_HINT}.")
    a, b = parts
    if a in vocab and b in vocab and a + b in vocab:
      merges.append((a, b))
  return merges


def _clip_bpe(vocab_path: str, merges_path: str) -> tokenizers.Tokenizer:
  vocab = _check_vocab(_read_json(vocab_path), vocab_path)
  for token in (BOS_TOKEN, EOS_TOKEN):
    if token not in vocab:
      raise ValueError(f"{vocab_path}: the vocabulary has no {token!r}; this is not a CLIP "
                       f"vocabulary; {_HINT}.")
  bpe = models.BPE(vocab=vocab, merges=_read_merges(merges_path, vocab), unk_token=EOS_TOKEN,
                   continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
  tok = tokenizers.Tokenizer(bpe)
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
       pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
  return tok


class CLIPTokenizer:
  """Prompts -> CLIP token ids ``[B, max_length]`` (see the module docstring)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str = EOS_TOKEN,
               max_length: int = MAX_LENGTH, source: str = "tokenizer"):
    if max_length < 2:
      raise ValueError(f"max_length must be at least 2 (start and end tokens); got {max_length}.")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self._tok = tokenizer
    self.source = source
    self.max_length = int(max_length)
    ids = {}
    for name, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", pad_token)):
      ids[name] = tokenizer.token_to_id(token)
      if ids[name] is None:
        raise ValueError(f"{source}: the {name} token {token!r} is not in the vocabulary; {_HINT}.")
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
    self.pad_token = pad_token

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def max_id(self) -> int:
    """The largest id the tokenizer can emit."""
    return max(self._tok.get_vocab(with_added_tokens=True).values())

  def check_fits(self, embedding_rows: int, what: str = "the text encoder") -> "CLIPTokenizer":
    """``self`` when every id it can emit is below ``embedding_rows`` (the rows of the text
    encoder's token embedding); else ``UserError`` naming the tokenizer, the id and the table."""
    vocab = self._tok.get_vocab(with_added_tokens=True)
    token, largest = max(vocab.items(), key=lambda kv: kv[1])
    if largest >= int(embedding_rows):
      raise UserError(f"{self.source}: token {token!r} has id {largest}, beyond the {embedding_rows} rows "
                      f"of {what}'s token embedding; the tokenizer and the text encoder do not belong "
                      f"together: {_HINT}.")
    return self

  def tokenize(self, prompt: str) -> List[str]:
    """The BPE tokens of one prompt, without start, end or padding (for inspection)."""
    return self._tok.encode(prompt, add_special_tokens=False).tokens

  def encode(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> int32 ``[B, max_length]``: start, prompt tokens (cut to fit), end, padding."""
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
      raise ValueError("encode: the prompt list is empty; pass at least one prompt (an empty "
                       "string is a valid, unconditional prompt).")
    for i, p in enumerate(prompts):
      if not isinstance(p, str):
        raise TypeError(f"encode: prompt {i} is a {type(p).__name__}, not a string.")
    room = self.max_length - 2
    out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    for row, enc in enumerate(self._tok.encode_batch(prompts, add_special_tokens=False)):
      body = enc.ids[:room]
      out[row, 0] = self.bos_id
      out[row, 1:1 + len(body)] = body
      out[row, 1 + len(body)] = self.eos_id
    return out

  __call__ = encode


def _pad_token(folder: str) -> str:
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      data = _read_json(path)
      token = _special_content(data.get("pad_token")) if isinstance(data, dict) else None
      if token:
        return token
  return EOS_TOKEN


def load_tokenizer(folder: str, max_length: int = MAX_LENGTH,
                   embedding_rows: Optional[int] = None) -> CLIPTokenizer:
  """The CLIP tokenizer of ``folder`` (Meissonic's ``tokenizer/``, or the folder holding it).

  With ``embedding_rows`` (the text encoder's ``vocab_size``) an id the encoder cannot embed is
  refused (``CLIPTokenizer.check_fits``).
  """
  folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder not found: {folder}; {_HINT}.")
  files = ("vocab.json", "merges.txt", "tokenizer.json")
  if (not any(os.path.isfile(os.path.join(folder, f)) for f in files)
      and os.path.isdir(os.path.join(folder, "tokenizer"))):
    folder = os.path.join(folder, "tokenizer")
  vocab, merges, whole = (os.path.join(folder, f) for f in files)
  if os.path.isfile(vocab) and os.path.isfile(merges):
    tok = _clip_bpe(vocab, merges)
    source = f"{vocab} + merges.txt"
  elif os.path.isfile(whole):
    try:
      tok = tokenizers.Tokenizer.from_str(text_files.read_text(whole, _HINT))
    except UserError:
      raise
    except Exception as e:  # the library raises its own exception type
      raise UserError(f"{whole}: cannot be read as a tokenizers file ({str(e)[:160]}); {_HINT}.") from None
    ids = list(tok.get_vocab(with_added_tokens=True).values())
    if ids and min(ids) < 0:
      raise UserError(f"{whole}: holds the negative id {min(ids)}; {_HINT}.")
    source = whole
  else:
    present = [f for f in ("vocab.json", "merges.txt") if os.path.isfile(os.path.join(folder, f))]
    lacking = [f for f in ("vocab.json", "merges.txt") if f not in present]
    raise FileNotFoundError(
        f"{folder}: missing {' and '.join(lacking)} (and no tokenizer.json)"
        f"{' beside ' + ', '.join(present) if present else ''}; {_HINT}.")
  tokenizer = CLIPTokenizer(tok, pad_token=_pad_token(folder), max_length=max_length, source=source)
  return tokenizer if embedding_rows is None else tokenizer.check_fits(embedding_rows)


def read_prompts(path: str, max_chars: int = MAX_PROMPT_CHARS) -> List[str]:
  """Prompts of a text file, one per line (stripped, blank lines skipped).

  A line over ``max_chars`` characters is an error naming its line number.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file not found: {path}; pass a UTF-8 text file with one "
                            "prompt per line.")
  prompts = []
  for n, line in enumerate(text_files.read_lines(path, "write one prompt per line"), 1):
    text = line.strip()
    if not text:
      continue
    if len(text) > max_chars:
      raise UserError(f"{path}, line {n}: the prompt has {len(text)} characters, over the "
                      f"limit of {max_chars}; shorten it (CLIP reads at most 75 tokens) or "
                      "raise the limit.")
    prompts.append(text)
  if not prompts:
    raise ValueError(f"{path}: the prompt file is empty (no non-blank line); write one prompt "
                     "per line.")
  return prompts
