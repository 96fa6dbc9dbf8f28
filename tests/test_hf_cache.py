"""Hugging Face model ids as converter inputs: a cache in huggingface_hub's own layout on disk, read
offline (``HF_HUB_OFFLINE=1``), and a tiny released CLIP text folder converted end to end through it."""
import hashlib
import os

import numpy as np
import pytest

from dimo_jax import convert
from dimo_jax.converters import clip_text as conv
from dimo_jax.converters import hf_cache
from dimo_jax.converters.safetensors_io import save_safetensors
from dimo_jax.networks import clip_text as clip

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def _cache_file(cache, repo, commit, rel_path, data: bytes, ref=None):
  """Writes ``rel_path`` of ``repo`` at ``commit`` as huggingface_hub does: the bytes in
  ``blobs/<sha256>``, a relative symlink in ``snapshots/<commit>/``, ``refs/<ref>`` naming the commit."""
  root = os.path.join(cache, "models--" + repo.replace("/", "--"))
  blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
  os.makedirs(os.path.dirname(blob), exist_ok=True)
  with open(blob, "wb") as f:
    f.write(data)
  link = os.path.join(root, "snapshots", commit, rel_path)
  os.makedirs(os.path.dirname(link), exist_ok=True)
  os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
  if ref:
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", ref), "w") as f:
      f.write(commit)
  return os.path.join(root, "snapshots", commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
  cache = str(tmp_path / "hub")
  monkeypatch.setenv("HF_HUB_CACHE", cache)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)
  return cache


def _tiny_release(tmp_path, seed=0):
  """A released ``text_encoder/model.safetensors`` of the tiny CLIP tower: its bytes and state dict."""
  rng = np.random.default_rng(seed)
  sd = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in conv.clip_text_layout(clip.CLIPTextConfig.tiny()).items()}
  path = tmp_path / f"release_{seed}.safetensors"
  save_safetensors(str(path), sd)
  return path.read_bytes(), sd


@pytest.mark.parametrize("text,sub,rev,want", [
    ("MeissonFlow/Meissonic", "", "", ("MeissonFlow/Meissonic", None, "")),
    ("MeissonFlow/Meissonic:transformer", "", "", ("MeissonFlow/Meissonic", None, "transformer")),
    ("Yuanzhi/DiMO@v1:models/meissonic/transformer", "", "", ("Yuanzhi/DiMO", "v1", "models/meissonic/transformer")),
    ("org/name", "sub/", "abc", ("org/name", "abc", "sub")),
    ("org/name@abc:sub", "sub", "abc", ("org/name", "abc", "sub")),
    ("/abs/path", "", "", None), ("./org/name", "", "", None), ("file.pth", "", "", None),
    ("a/b/c", "", "", None),
])
def test_parse_id(text, sub, rev, want):
  got = hf_cache.parse_id(text, sub, rev)
  assert (None if got is None else (got.repo, got.revision, got.subfolder)) == want


def test_parse_id_conflicts_fail_clearly():
  with pytest.raises(ValueError, match="names the subfolder 'a' but --subfolder='b'"):
    hf_cache.parse_id("org/name:a", "b")
  with pytest.raises(ValueError, match="names the revision 'r1' but --revision='r2'"):
    hf_cache.parse_id("org/name@r1", "", "r2")
  with pytest.raises(ValueError, match="may not contain '..'"):
    hf_cache.parse_id("org/name:../../etc")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
  assert hf_cache.cache_dir() == str(tmp_path / "home" / "hub")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
  assert hf_cache.cache_dir() == str(tmp_path / "c")


def test_resolves_refs_revisions_and_subfolders_offline(hub):
  main = _cache_file(hub, "org/name", COMMIT, "transformer/model.safetensors", b"main", ref="main")
  old = _cache_file(hub, "org/name", OTHER, "transformer/model.safetensors", b"old", ref="v0")
  assert hf_cache.resolve_input("org/name") == main
  assert hf_cache.resolve_input("org/name", subfolder="transformer") == os.path.join(main, "transformer")
  got = hf_cache.resolve_input("org/name@v0:transformer/model.safetensors")
  assert got == os.path.join(old, "transformer", "model.safetensors") and open(got, "rb").read() == b"old"
  # A commit hash needs no ref.
  assert hf_cache.resolve_input("org/name", revision=OTHER) == old


def test_a_local_path_wins_and_non_ids_pass_through(hub, tmp_path):
  _cache_file(hub, "org/name", COMMIT, "x/y.bin", b"1", ref="main")
  local = tmp_path / "org" / "name"
  local.mkdir(parents=True)
  assert hf_cache.resolve_input("org/name") == "org/name"
  assert hf_cache.resolve_input("org/name", subfolder="x") == os.path.join("org/name", "x")
  assert hf_cache.resolve_input("missing.pth") == "missing.pth"  # the converter reports it
  with pytest.raises(ValueError, match="--revision=v1 applies to Hugging Face model ids"):
    hf_cache.resolve_input("org/name", revision="v1")
  with pytest.raises(FileNotFoundError, match="neither a local path nor a Hugging Face model id"):
    hf_cache.resolve_input("/no/such/file.pth", subfolder="x")


def test_missing_ids_name_the_cache_and_the_download_command(hub):
  with pytest.raises(FileNotFoundError) as e:
    hf_cache.resolve_input("MeissonFlow/Meissonic:transformer")
  msg = str(e.value)
  assert len(msg.splitlines()) == 1
  assert f"Hugging Face cache {hub}" in msg and "no local file or folder" in msg
  assert "`hf download MeissonFlow/Meissonic --include 'transformer/*' 'transformer'`" in msg
  assert "--allow_download" in msg
  _cache_file(hub, "MeissonFlow/Meissonic", COMMIT, "vqvae/model.safetensors", b"v", ref="main")
  with pytest.raises(FileNotFoundError, match=f"has no 'transformer' in its cached snapshot {COMMIT}"):
    hf_cache.resolve_input("MeissonFlow/Meissonic:transformer")
  with pytest.raises(FileNotFoundError, match="@v2 is not in the Hugging Face cache.*--revision v2"):
    hf_cache.resolve_input("MeissonFlow/Meissonic@v2")
  # Downloading is refused while HF_HUB_OFFLINE is set, with the same advice.
  with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
    hf_cache.resolve_input("MeissonFlow/Other", allow_download=True)


def test_convert_reads_a_model_id_from_the_cache(hub, tmp_path):
  data, sd = _tiny_release(tmp_path, seed=0)
  _cache_file(hub, "MeissonFlow/Meissonic", COMMIT, "text_encoder/model.safetensors", data, ref="main")
  old_data, old_sd = _tiny_release(tmp_path, seed=1)
  _cache_file(hub, "MeissonFlow/Meissonic", OTHER, "text_encoder/model.safetensors", old_data, ref="v0")

  out = tmp_path / "te"
  assert convert.main(["clip-text", "--input=MeissonFlow/Meissonic", "--subfolder=text_encoder",
                       f"--output={out}"]) == 0
  _, params = conv.load_clip_text(str(out))
  emb = np.asarray(params["token_embedding"]["embedding"])
  np.testing.assert_array_equal(emb, sd["text_model.embeddings.token_embedding.weight"])

  out_old = tmp_path / "te_old"
  assert convert.main(["clip-text", "--input=MeissonFlow/Meissonic@v0:text_encoder", f"--output={out_old}"]) == 0
  _, params = conv.load_clip_text(str(out_old))
  np.testing.assert_array_equal(np.asarray(params["token_embedding"]["embedding"]),
                                old_sd["text_model.embeddings.token_embedding.weight"])
  with pytest.raises(FileNotFoundError, match="hf download MeissonFlow/Meissonic --include 'vqvae/"):
    convert.main(["meissonic-vq", "--input=MeissonFlow/Meissonic:vqvae", f"--output={tmp_path / 'vq'}"])
