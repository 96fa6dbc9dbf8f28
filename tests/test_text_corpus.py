"""The text corpora: tokenisers round-trip, document packing, the held-out split, bad input."""
import os

import ml_collections
import numpy as np
import pytest

from dimo_jax.data import text_corpus as tc
from dimo_jax.storage.checkpoints import UserError


def _cfg(**kw):
  base = dict(name="embedded", seq_len=64, val_fraction=0.1, seed=0, tokenizer="bytes", tokenizer_path="",
              vocab_size=0, max_examples=0, path="", split_blank_lines=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_byte_tokenizer_round_trips_unicode_and_marks_the_separator():
  tok = tc.ByteTokenizer()
  text = "Grüße, 世界! tabs\tand\nnewlines"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(np.concatenate([tok.encode("a"), [tok.sep_id], tok.encode("b")])) == "a" + tc.SEPARATOR + "b"


def test_bpe_trained_on_the_corpus_round_trips_and_reloads(tmp_path):
  docs = tc.embedded_documents()[:6]
  tok = tc.train_bpe(docs, 320)
  assert tok.vocab_size == 320 and tok.decode([tok.sep_id]) == tc.SEPARATOR
  sample = docs[0][:500] + " ünïcode"
  ids = tok.encode(sample)
  assert len(ids) < len(sample.encode("utf-8"))  # merges compress
  assert tok.decode(ids) == sample
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  again = tc.load_bpe(str(tmp_path))
  assert again.encode(sample).tolist() == ids.tolist() and again.sep_id == tok.sep_id


def test_pack_appends_separators_and_cuts_rows():
  rows = tc.pack([np.array([1, 2, 3]), np.array([4, 5])], 3, 9)
  np.testing.assert_array_equal(rows, [[1, 2, 3], [9, 4, 5]])  # the trailing separator is the remainder
  with pytest.raises(UserError, match="fewer than config.data.seq_len=8"):
    tc.pack([np.array([1, 2])], 8, 9, what="doc.txt")


def test_held_out_split_is_deterministic_and_order_free():
  docs = [f"document number {i} " * 3 for i in range(200)]
  train, val = tc.split_held_out(docs, 0.1, seed=0)
  train2, val2 = tc.split_held_out(docs[::-1], 0.1, seed=0)
  assert sorted(val) == sorted(val2) and len(train) + len(val) == 200
  assert 8 <= len(val) <= 35 and not set(train) & set(val)
  assert sorted(tc.split_held_out(docs, 0.1, seed=1)[1]) != sorted(val)


def test_embedded_corpus_is_real_text_with_both_splits():
  corpus = tc.load_text_corpus(_cfg())
  ds = corpus.dataset
  assert ds.vocab_size == 257 and ds.seq_len == 64 and ds.num_classes == 0
  assert ds.num_train > 5000 and ds.num_val > 100
  text = corpus.decode(ds.train_tokens[:50].reshape(-1))
  assert " the " in text and "statement" in text
  # every separator ends a document: the packed stream decodes to the held-out documents joined
  stream = corpus.decode(ds.val_tokens.reshape(-1))
  assert stream.startswith(corpus.val_documents[0])


def test_text_files_one_document_per_file_or_per_blank_line_block(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\n\nstill first")
  (tmp_path / "b.txt").write_text("second doc")
  assert tc.text_file_documents([str(tmp_path)]) == ["first doc\n\nstill first", "second doc"]
  assert tc.text_file_documents([str(tmp_path)], split_blank_lines=True) == ["first doc", "still first",
                                                                               "second doc"]


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"), (b"  \n\n", "the file is empty"),
    (b"\x89PNG\x00\x01\x02", "binary file"), (b"caf\xe9 latin1", "not UTF-8")])
def test_bad_text_files_fail_naming_the_file_and_the_fix(tmp_path, content, message):
  path = tmp_path / "bad.txt"
  path.write_bytes(content)
  with pytest.raises(UserError, match=message) as err:
    tc.load_text_corpus(_cfg(name="text", path=str(path)))
  assert str(path) in str(err.value)


def test_sequence_longer_than_the_data_fails_naming_the_file(tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("only a few words here")
  with pytest.raises(UserError, match="lower --config.data.seq_len") as err:
    tc.load_text_corpus(_cfg(name="text", path=str(path), seq_len=4096, val_fraction=0.0))
  assert str(path) in str(err.value)


def test_missing_paths_and_bad_tokenizers_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tc.load_text_corpus(_cfg(name="text", path=str(tmp_path / "nope.txt")))
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tc.load_bpe(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(UserError, match="not a readable tokenizer.json"):
    tc.load_bpe(str(tmp_path / "tokenizer.json"))
  with pytest.raises(UserError, match="config.data.tokenizer='chars'"):
    tc.load_text_corpus(_cfg(tokenizer="chars"))


def test_npy_stream_is_memory_mapped_and_split_at_the_end(tmp_path):
  path = str(tmp_path / "ids.npy")
  np.save(path, np.arange(1000, dtype=np.uint16) % 50)
  corpus = tc.load_text_corpus(_cfg(name="npy", path=path, seq_len=10, val_fraction=0.1))
  ds = corpus.dataset
  assert isinstance(ds.train_tokens.base, np.memmap) or isinstance(ds.train_tokens, np.memmap)
  assert ds.num_train == 90 and ds.num_val == 10 and ds.vocab_size == 50
  np.testing.assert_array_equal(ds.val_tokens[-1], np.arange(990, 1000) % 50)
  np.save(path, np.zeros((10,), np.float32))
  with pytest.raises(UserError, match="not an integer type"):
    tc.load_text_corpus(_cfg(name="npy", path=path, seq_len=2))
  np.save(path, np.zeros((5, 3), np.int32))  # [N, L] rows of another length
  with pytest.raises(UserError, match="set --config.data.seq_len=3"):
    tc.load_text_corpus(_cfg(name="npy", path=path, seq_len=4))


def test_tfds_without_the_set_names_the_fix(tmp_path):
  with pytest.raises(UserError, match="tfds"):
    tc.load_text_corpus(_cfg(name="tfds", tfds_name="lm1b", tfds_data_dir=str(tmp_path)))
