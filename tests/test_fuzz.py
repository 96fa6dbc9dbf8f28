"""Malformed files at the readers' boundaries (hypothesis): every input is read or refused with a
user error naming the file, never another exception type. ``DIMO_FUZZ_EXAMPLES`` sets the examples
per test (100; the file takes about 25 s on 2 CPU cores)."""
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dimo_jax.converters import clip_text, meissonic, meissonic_vq, safetensors_io
from dimo_jax.data import datasets
from dimo_jax.storage.checkpoints import UserError

FUZZ = settings(max_examples=int(os.environ.get("DIMO_FUZZ_EXAMPLES", 100)), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
_DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "X9", ""])
_COUNTS = st.integers(-3, 40) | st.sampled_from([2**31, 2**63, 2**64 + 1])
_ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": _DTYPES | _JSON, "shape": st.lists(_COUNTS, max_size=3) | _JSON,
    "data_offsets": st.lists(_COUNTS, min_size=0, max_size=3) | _JSON})
_HEADER = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), _ENTRY | _JSON, max_size=3) | _JSON


def _assert_user_error(call, path):
  """Runs ``call``; a refusal must be a ``UserError`` naming ``path`` in one or two lines."""
  try:
    return call()
  except UserError as e:
    assert path in str(e) and len(str(e).splitlines()) <= 2, str(e)
  return None


def _write_safetensors(path, header_bytes, data):
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


@FUZZ
@given(header=_HEADER, data=st.binary(max_size=64))
def test_safetensors_headers(tmp_path, header, data):
  path = str(tmp_path / "f.safetensors")
  _write_safetensors(path, json.dumps(header).encode(), data)
  out = _assert_user_error(lambda: safetensors_io.load_safetensors(path, dtype=None), path)
  if out is not None:  # what is read back is what the header describes
    for name, array in out.items():
      assert header[name]["shape"] == list(array.shape)


@FUZZ
@given(blob=st.binary(max_size=48), length=st.integers(0, 2**64 - 1) | st.integers(0, 80), tail=st.binary(max_size=40))
def test_safetensors_raw_bytes(tmp_path, blob, length, tail):
  path = str(tmp_path / "g.safetensors")
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", length) + blob + tail)
  _assert_user_error(lambda: safetensors_io.load_safetensors(path), path)


@FUZZ
@given(cut=st.integers(0, 200), flip=st.integers(0, 400), byte=st.integers(0, 255))
def test_safetensors_damaged_valid_file(tmp_path, cut, flip, byte):
  path = str(tmp_path / "h.safetensors")
  safetensors_io.save_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                                         "n": np.arange(3, dtype=np.int64)})
  raw = bytearray(open(path, "rb").read())
  if flip < len(raw):
    raw[flip] = byte
  with open(path, "wb") as f:
    f.write(bytes(raw[:len(raw) - cut]))
  _assert_user_error(lambda: safetensors_io.load_safetensors(path), path)


_CLIP_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id",
              "architectures", "text_config"]
_MEISSONIC_KEYS = ["num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "vocab_size",
                   "codebook_size", "joint_attention_dim", "pooled_projection_dim", "axes_dims_rope", "downsample",
                   "upsample"]
_VQ_KEYS = ["_class_name", "mid_block_add_attention", "norm_type", "act_fn", "down_block_types", "up_block_types",
            "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "num_vq_embeddings", "vq_embed_dim", "norm_num_groups"]


def _config_strategy(keys):
  return st.dictionaries(st.sampled_from(keys), _JSON | st.integers(0, 64), max_size=5) | _JSON


@FUZZ
@given(which=st.sampled_from(["clip", "meissonic", "vq"]), data=st.data())
def test_config_json_readers(tmp_path, which, data):
  keys, read = {"clip": (_CLIP_KEYS, clip_text.config_from_transformers),
                "meissonic": (_MEISSONIC_KEYS, meissonic.config_from_diffusers),
                "vq": (_VQ_KEYS, meissonic_vq.config_from_diffusers)}[which]
  value = data.draw(_config_strategy(keys))
  raw = data.draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff"]))
  path = str(tmp_path / "config.json")
  with open(path, "wb") as f:
    f.write(raw + json.dumps(value).encode())
  from dimo_jax.storage import text_files
  _assert_user_error(lambda: read(text_files.read_json(path), path), path)


_NPY_DTYPES = st.sampled_from(["<i4", "<i8", "|u1", "<u2", "<u8", "<f4", "|b1", "<i2", "|O", "<U3", ">i4"])


@FUZZ
@given(dtype=_NPY_DTYPES, shape=st.lists(st.integers(0, 5), max_size=3),
       values=st.lists(st.integers(-3, 2**40) | st.sampled_from([2**63 - 1, -2**63]), max_size=30), vocab=st.sampled_from([None, 0, 1, 9, 2**40]))
def test_token_arrays(tmp_path, dtype, shape, values, vocab):
  path = str(tmp_path / "t.npy")
  size = int(np.prod(shape)) if shape else 1
  with np.errstate(all="ignore"):
    arr = np.resize(np.array(values or [0], dtype=np.int64), size).astype(dtype).reshape(shape)
  np.save(path, arr, allow_pickle=dtype == "|O")
  try:
    ds = datasets.load_npy(path, vocab_size=vocab)
  except ValueError as e:  # UserError is one; every refusal names the file
    assert path in str(e), str(e)
  else:
    assert ds.train_tokens.dtype == np.int32 and int(ds.train_tokens.max()) < ds.vocab_size


@FUZZ
@given(header=st.binary(max_size=40), body=st.binary(max_size=40), version=st.sampled_from([b"\x01\x00", b"\x02\x00",
                                                                                           b"\x03\x00", b"\x09\x09"]))
def test_token_files_of_random_bytes(tmp_path, header, body, version):
  assume(header or body)
  path = str(tmp_path / "r.npy")
  head = b"\x93NUMPY" + version + struct.pack("<H", len(header)) + header
  with open(path, "wb") as f:
    f.write(head + body)
  try:
    datasets.load_npy(path)
  except ValueError as e:
    assert path in str(e), str(e)


def test_fuzz_helpers_fail_on_other_errors(tmp_path):
  """The check itself fails for an exception that is not a user error (it cannot pass vacuously)."""
  with pytest.raises(KeyError):
    _assert_user_error(lambda: {}["x"], str(tmp_path))
  with pytest.raises(AssertionError):
    _assert_user_error(lambda: (_ for _ in ()).throw(UserError("another file")), os.fspath(tmp_path))


@pytest.fixture(scope="module")
def torch_files_made(tmp_path_factory):
  """A legacy and a zip torch file of one small state dict (bytes)."""
  import io
  torch = pytest.importorskip("torch")
  out = {}
  for name, zipped in (("legacy", False), ("zip", True)):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, buf, _use_new_zipfile_serialization=zipped)
    out[name] = buf.getvalue()
  return out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@FUZZ
@given(which=st.sampled_from(["legacy", "zip"]), cut=st.integers(0, 300), flip=st.integers(0, 2000),
       byte=st.integers(0, 255))
def test_torch_files_damaged(tmp_path, torch_files_made, which, cut, flip, byte):
  from dimo_jax.converters import torch_files
  raw = bytearray(torch_files_made[which])
  if flip < len(raw):
    raw[flip] = byte
  path = str(tmp_path / "m.pt")
  with open(path, "wb") as f:
    f.write(bytes(raw[:max(0, len(raw) - cut)]))
  try:
    torch_files.load_torch_file(path, placeholders=True)
  except ValueError as e:  # UserError is one; every refusal names the file
    assert path in str(e), str(e)
