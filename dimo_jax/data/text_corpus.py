"""Text corpora as 1-D token sequences for the text masked-diffusion family.

Tokenisers (both round-trip ``decode(encode(text)) == text``):

- ``ByteTokenizer`` (the default, no files): ids 0..255 are the UTF-8 bytes, id 256 the document
  separator ``SEPARATOR``; vocabulary 257.
- ``BPETokenizer``: byte-level BPE of the ``tokenizers`` library, trained on the training
  documents (``train_bpe``) or read from a user's ``tokenizer.json`` (``load_bpe``); the separator
  is its special token ``SEPARATOR``.

Sources (``config.data.name``):

- ``embedded``: the prose of the Python language reference that ships with every Python
  (``pydoc_data.topics``: 79 topics, about 465 KB of English with code excerpts; PSF licence).
  Real natural-language text that needs no download and nothing stored in the repository; one
  document per topic. Its exact text follows the installed Python version (3.11: 464,970
  characters), so results name the version.
- ``text``: a user's ``.txt`` files (or folders of them): one document per file, or documents
  separated by blank lines (``config.data.split_blank_lines``).
- ``npy``: a pre-tokenised corpus, an integer ``.npy`` of a 1-D token stream (cut into sequences)
  or ``[N, L]`` sequences, read memory-mapped.
- ``tfds``: a TensorFlow Datasets text set (``lm1b``, ``text8``) already in the user's
  ``tfds_data_dir``.

Documents are tokenised, each followed by the separator, concatenated and cut into fixed-length
sequences (``pack``). The held-out split is deterministic: a document is held out when a hash of
its text (and ``config.data.seed``) falls below ``val_fraction``, so every metric reads the same
documents whatever their order (``tfds`` alike; ``npy``: the last ``val_fraction`` of the sequences).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Iterable, List, Optional, Sequence

import numpy as np

from dimo_jax.data.datasets import TokenDataset
from dimo_jax.storage.checkpoints import UserError, atomic_write_bytes

SEPARATOR = "<|sep|>"
SOURCES = ("embedded", "text", "npy", "tfds")
TOKENIZERS = ("bytes", "bpe")


# ---------------------------------------------------------------------------- tokenisers
class ByteTokenizer:
  """UTF-8 bytes (ids 0..255) and the document separator (id 256)."""
  kind = "bytes"
  vocab_size = 257
  sep_id = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``; the separator reads ``SEPARATOR``, invalid UTF-8 the replacement character."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    out, run = [], []
    for i in ids.tolist():
      if 0 <= i < 256:
        run.append(i)
        continue
      out.append(bytes(run).decode("utf-8", errors="replace"))
      run = []
      out.append(SEPARATOR if i == self.sep_id else "\ufffd")
    out.append(bytes(run).decode("utf-8", errors="replace"))
    return "".join(out)


class BPETokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer`` with the separator as a special token."""
  kind = "bpe"

  def __init__(self, tokenizer, source: str = "trained"):
    self.tok = tokenizer
    self.source = source
    sep = tokenizer.token_to_id(SEPARATOR)
    if sep is None:
      raise UserError(f"{source}: the tokenizer has no {SEPARATOR!r} token; add it as a special token "
                      f"or train one with --config.data.tokenizer=bpe --config.data.tokenizer_path=''")
    self.sep_id = int(sep)
    self.vocab_size = int(tokenizer.get_vocab_size())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)]
    return self.tok.decode(ids, skip_special_tokens=False)

  def save(self, path: str) -> None:
    """Writes the tokenizer's ``tokenizer.json`` atomically."""
    atomic_write_bytes(path, self.tok.to_str().encode("utf-8"))


def train_bpe(documents: Sequence[str], vocab_size: int) -> BPETokenizer:
  """A byte-level BPE of ``vocab_size`` tokens (at least 257: the bytes and the separator)."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  if vocab_size < 257:
    raise UserError(f"config.data.vocab_size={vocab_size} is too small for a byte-level BPE; use at least 257")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[SEPARATOR], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(documents), trainer=trainer)
  return BPETokenizer(tok, "trained")


def load_bpe(path: str) -> BPETokenizer:
  """A user's ``tokenizer.json`` (a folder holding one, or the file); it must know ``SEPARATOR``."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.data.tokenizer_path={path}: no tokenizer.json there; give the file "
                            "written by tokenizers' Tokenizer.save, or '' to train one on the corpus")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as err:  # the library raises its own exception types
    raise UserError(f"{path}: not a readable tokenizer.json ({str(err).splitlines()[0][:120]}); "
                    "give a file written by tokenizers' Tokenizer.save") from err
  return BPETokenizer(tok, path)


# ---------------------------------------------------------------------------- documents
def embedded_documents() -> List[str]:
  """The Python language reference topics of ``pydoc_data.topics`` (one document each, sorted by name)."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return [topics.topics[k].strip() for k in sorted(topics.topics) if topics.topics[k].strip()]


def _txt_files(paths: Sequence[str]) -> List[str]:
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
      if not found:
        raise UserError(f"config.data.path: the folder {path} holds no .txt file; put the documents in .txt files")
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"config.data.path: {path} does not exist; give .txt files or folders of them "
                              "(comma-separated)")
  return files


def read_text_file(path: str) -> str:
  """The UTF-8 text of ``path``; a binary, non-UTF-8 or empty file fails naming the file and the fix."""
  with open(path, "rb") as f:
    raw = f.read()
  if b"\x00" in raw:
    raise UserError(f"{path}: a binary file (it holds NUL bytes), not text; give UTF-8 .txt files "
                    "(pre-tokenised data goes in a .npy with --config.data.name=npy)")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as err:
    raise UserError(f"{path}: not UTF-8 text (byte {err.start}); convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path}`") from err
  if not text.strip():
    raise UserError(f"{path}: the file is empty; remove it or give it text")
  return text


def split_documents(text: str) -> List[str]:
  """Documents separated by blank lines (lines holding only white space count as blank)."""
  docs, cur = [], []
  for line in text.splitlines():
    if line.strip():
      cur.append(line)
    elif cur:
      docs.append("\n".join(cur))
      cur = []
  if cur:
    docs.append("\n".join(cur))
  return docs


def text_file_documents(paths: Sequence[str], split_blank_lines: bool = False) -> List[str]:
  """Documents of the user's ``.txt`` files: one per file, or one per blank-line-separated block."""
  docs = []
  for path in _txt_files(paths):
    text = read_text_file(path)
    docs.extend(split_documents(text) if split_blank_lines else [text.strip()])
  return docs


def is_held_out(document: str, val_fraction: float, seed: int = 0) -> bool:
  """The deterministic split: a hash of the document's text and ``seed`` below ``val_fraction``."""
  h = zlib.crc32(document.encode("utf-8"), zlib.crc32(str(int(seed)).encode()))
  return (h & 0xFFFFFFFF) / 2.0**32 < val_fraction


def split_held_out(documents: Sequence[str], val_fraction: float, seed: int = 0):
  """``(train, val)`` documents by ``is_held_out``; at least one document on each side when there are two."""
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"config.data.val_fraction={val_fraction} must be in [0, 1)")
  flags = [is_held_out(d, val_fraction, seed) for d in documents]
  if val_fraction > 0 and len(documents) >= 2:
    if not any(flags):  # hold out the document with the smallest hash
      order = sorted(range(len(documents)), key=lambda i: zlib.crc32(documents[i].encode("utf-8")))
      flags[order[0]] = True
    if all(flags):
      flags[0] = False
  train = [d for d, f in zip(documents, flags) if not f]
  val = [d for d, f in zip(documents, flags) if f]
  return train, val


def pack(documents: Sequence[np.ndarray], seq_len: int, sep_id: int, *, what: str = "the corpus") -> np.ndarray:
  """Token arrays, each followed by ``sep_id``, concatenated and cut into ``[N, seq_len]`` rows (the
  remainder shorter than a row is dropped). Fails, naming ``what``, when fewer than ``seq_len`` tokens."""
  if seq_len < 1:
    raise UserError(f"config.data.seq_len={seq_len} must be >= 1")
  parts = []
  for d in documents:
    parts.append(np.asarray(d, np.int32).reshape(-1))
    parts.append(np.asarray([sep_id], np.int32))
  stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
  n = stream.size // seq_len
  if n == 0:
    raise UserError(f"{what}: {stream.size} tokens, fewer than config.data.seq_len={seq_len}; give more "
                    f"text or lower --config.data.seq_len")
  return stream[: n * seq_len].reshape(n, seq_len)


# ---------------------------------------------------------------------------- the corpus
@dataclasses.dataclass
class TextCorpus:
  """Packed train / held-out sequences (``dataset``, unconditional), the tokenizer and, where the
  source has them, the held-out documents as text."""
  dataset: TokenDataset
  tokenizer: object
  sep_id: int
  source: str
  val_documents: Optional[List[str]] = None

  @property
  def vocab_size(self) -> int:
    return self.dataset.vocab_size

  @property
  def seq_len(self) -> int:
    return self.dataset.seq_len

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)


def _make_tokenizer(data_cfg, train_docs: Sequence[str]):
  kind = data_cfg.get("tokenizer", "bytes")
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "bpe":
    path = data_cfg.get("tokenizer_path", "")
    return load_bpe(path) if path else train_bpe(train_docs, int(data_cfg.get("vocab_size", 0) or 1024))
  raise UserError(f"config.data.tokenizer={kind!r} is not known; choose one of {list(TOKENIZERS)}")


def _cap(tokens: np.ndarray, max_examples: int) -> np.ndarray:
  return tokens[:max_examples] if max_examples and max_examples > 0 else tokens


def corpus_from_documents(documents: Sequence[str], data_cfg, source: str) -> TextCorpus:
  """Splits, tokenises and packs ``documents`` (``config.data``: seq_len, val_fraction, seed,
  tokenizer, tokenizer_path, vocab_size, max_examples)."""
  if not documents:
    raise UserError(f"{source}: no documents; give text")
  seq_len = int(data_cfg.seq_len)
  train_docs, val_docs = split_held_out(documents, float(data_cfg.get("val_fraction", 0.1)),
                                        int(data_cfg.get("seed", 0)))
  tok = _make_tokenizer(data_cfg, train_docs)
  encode = lambda docs: [tok.encode(d) for d in docs]
  train = _cap(pack(encode(train_docs), seq_len, tok.sep_id, what=f"{source} (training split)"),
               int(data_cfg.get("max_examples", 0)))
  val = pack(encode(val_docs), seq_len, tok.sep_id, what=f"{source} (held-out split)")
  ds = TokenDataset(train_tokens=train, train_labels=None, val_tokens=val, val_labels=None,
                    vocab_size=int(tok.vocab_size), num_classes=0, image_shape=None, name=source)
  return TextCorpus(ds, tok, int(tok.sep_id), source, list(val_docs))


def load_npy_tokens(path: str, seq_len: int, val_fraction: float = 0.1, vocab_size: int = 0,
                    sep_id: int = -1) -> TextCorpus:
  """A pre-tokenised corpus read memory-mapped: a 1-D stream cut into ``seq_len`` rows, or ``[N, L]``
  rows (L must equal ``seq_len``). The held-out split is the last ``val_fraction`` of the rows.
  ``vocab_size`` 0: the maximum id + 1 (a pass over the file); ``sep_id`` -1: none named."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.data.path={path}: no such file; give an integer .npy of token ids")
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except ValueError as err:
    raise UserError(f"{path}: not a readable .npy without pickles ({err}); save the ids with np.save") from err
  if not np.issubdtype(arr.dtype, np.integer):
    raise UserError(f"{path}: dtype {arr.dtype} is not an integer type; save token ids as int32 / uint16")
  if arr.ndim == 1:
    n = arr.shape[0] // seq_len
    if n < 2:
      raise UserError(f"{path}: {arr.shape[0]} tokens make fewer than 2 sequences of config.data.seq_len="
                      f"{seq_len}; lower the sequence length or give more tokens")
    rows = arr[: n * seq_len].reshape(n, seq_len)
  elif arr.ndim == 2:
    if arr.shape[1] != seq_len:
      raise UserError(f"{path}: rows of length {arr.shape[1]} but config.data.seq_len={seq_len}; set "
                      f"--config.data.seq_len={arr.shape[1]}")
    rows = arr
  else:
    raise UserError(f"{path}: shape {arr.shape}; give a 1-D token stream or [N, L] rows")
  lo, hi = _id_range(rows)
  if lo < 0:
    raise UserError(f"{path}: negative token id {lo}; ids must be in [0, vocab_size)")
  vocab = int(vocab_size) if vocab_size else hi + 1
  if hi >= vocab:
    raise UserError(f"{path}: token id {hi} >= config.data.vocab_size={vocab}; raise the vocabulary size")
  n_val = max(1, int(round(rows.shape[0] * val_fraction))) if val_fraction > 0 else 0
  if n_val >= rows.shape[0]:
    raise UserError(f"{path}: {rows.shape[0]} sequences leave none to train on with val_fraction={val_fraction}")
  ds = TokenDataset(train_tokens=rows[: rows.shape[0] - n_val], train_labels=None,
                    val_tokens=rows[rows.shape[0] - n_val:], val_labels=None, vocab_size=vocab, num_classes=0,
                    image_shape=None, name=os.path.basename(path))
  return TextCorpus(ds, None, int(sep_id), path)


def _id_range(rows, chunk: int = 1 << 22):
  flat = rows.reshape(-1)
  lo, hi = 0, 0
  for start in range(0, flat.shape[0], chunk):
    part = np.asarray(flat[start:start + chunk])
    lo, hi = min(lo, int(part.min())), max(hi, int(part.max()))
  return lo, hi


def tfds_documents(name: str, split: str, data_dir: str = "") -> List[str]:
  """The texts of a TensorFlow Datasets text set (``lm1b``: sentences; ``text8``: one long text)
  read from ``data_dir``; never downloads."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise UserError("config.data.name=tfds needs tensorflow-datasets (`pip install tensorflow-datasets`); "
                    "or export the text to .txt files and use --config.data.name=text") from err
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as err:  # tfds raises assorted types for a missing set
    raise UserError(f"TFDS text set {name!r} (split {split!r}) is not in config.data.tfds_data_dir="
                    f"{data_dir or '~/tensorflow_datasets'}: prepare it there with `tfds build {name}` "
                    f"on a machine with network access ({str(err).splitlines()[0][:100]})") from err
  docs = []
  for ex in tfds.as_numpy(ds):
    value = ex["text"] if isinstance(ex, dict) else ex
    docs.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  return docs


def load_text_corpus(data_cfg) -> TextCorpus:
  """The corpus ``config.data`` names (see the module docstring)."""
  name = data_cfg.get("name", "embedded")
  if name == "embedded":
    import sys  # pylint: disable=import-outside-toplevel
    return corpus_from_documents(embedded_documents(), data_cfg,
                                 f"embedded (pydoc_data.topics, Python {sys.version.split()[0]})")
  if name == "text":
    paths = [p for p in str(data_cfg.get("path", "")).split(",") if p]
    if not paths:
      raise UserError("config.data.name=text needs --config.data.path=<file.txt or folder>[,...]")
    docs = text_file_documents(paths, bool(data_cfg.get("split_blank_lines", False)))
    return corpus_from_documents(docs, data_cfg, ",".join(paths))
  if name == "npy":
    if not data_cfg.get("path", ""):
      raise UserError("config.data.name=npy needs --config.data.path=<tokens.npy>")
    return load_npy_tokens(data_cfg.path, int(data_cfg.seq_len), float(data_cfg.get("val_fraction", 0.01)),
                           int(data_cfg.get("vocab_size", 0) or 0), int(data_cfg.get("sep_id", -1)))
  if name == "tfds":
    tfds_name = data_cfg.get("tfds_name", "lm1b")
    docs = tfds_documents(tfds_name, "train", data_cfg.get("tfds_data_dir", ""))
    return corpus_from_documents(docs, data_cfg, f"tfds:{tfds_name}")
  raise UserError(f"config.data.name={name!r} is not a text source; choose one of {list(SOURCES)}")
