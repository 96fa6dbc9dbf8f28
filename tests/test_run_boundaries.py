"""Checks at the run path's file boundaries: the text-condition cache, the text-to-image export's
``settings.json``, the readers of a stored run, the write targets of every mode."""
import collections
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from dimo_jax.data import prompt_cache
from dimo_jax.storage import preflight
from dimo_jax.storage.checkpoints import UserError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import family_runs as runs  # noqa: E402  pylint: disable=wrong-import-position


def _full_disk(monkeypatch, free: int):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))


def _read_only(monkeypatch, folder):
  """``folder`` refuses new files (the tests run as root, where permission bits do not bite)."""
  real = preflight.tempfile.mkstemp
  folder = os.path.abspath(os.fspath(folder))

  def mkstemp(**kw):
    if os.path.abspath(kw.get("dir", "")) == folder:
      raise PermissionError(13, "Permission denied")
    return real(**kw)
  monkeypatch.setattr(preflight.tempfile, "mkstemp", mkstemp)

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


# ---------------------------------------------------------------------------- readers of a stored run
def _config(name):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hold(workdir):
  """A lock record of a live run (this test's parent process) in ``workdir``."""
  from dimo_jax.storage import workdir_lock  # pylint: disable=import-outside-toplevel
  import socket  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, workdir_lock.LOCK_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getppid(), "heartbeat": 1e18}, f)
  return path


def test_sample_refuses_a_held_or_unfinished_run(tmp_path):
  from dimo_jax.modes import sample  # pylint: disable=import-outside-toplevel
  from dimo_jax.storage import checkpoints  # pylint: disable=import-outside-toplevel
  run = tmp_path / "distill"
  os.makedirs(run / "checkpoints" / "100")
  lock = _hold(str(run))
  cfg = _config("digits")
  cfg.mode, cfg.sample.checkpoint, cfg.sample.model = "sample", str(run), "teacher"
  with pytest.raises(checkpoints.WorkdirInUse) as e:
    sample.run_sample(cfg, str(tmp_path / "out"))
  assert str(e.value) == (f"workdir {run} is held by a running job (host {__import__('socket').gethostname()}, pid "
                          f"{os.getppid()}, run.lock): sample it once that run has finished")
  os.remove(lock)
  cfg.sample.model = "generator"
  with pytest.raises(checkpoints.UserError) as e:
    sample.run_sample(cfg, str(tmp_path / "out"))
  assert str(e.value) == (f"the run in {run} is unfinished (checkpoints in {run}/checkpoints, no generator/ yet): "
                          "resume it with --config.mode=distill, or sample a finished generator")
  # Meissonic: an unfinished distillation named as the generator says so before any network is read.
  cfg = _config("meissonic")
  cfg.mode, cfg.sample.generator, cfg.sample.prompts = "sample", str(run), str(tmp_path / "p.txt")
  with pytest.raises(checkpoints.UserError, match=r"^the run in .*distill is unfinished \(checkpoints in"):
    sample.run_sample(cfg, str(tmp_path / "out"))
  # A finished generator folder (role: generator) is read, not refused.
  from dimo_jax.modes import loop  # pylint: disable=import-outside-toplevel
  checkpoints.write_config(str(run), {"role": "generator"})
  loop.check_stored_run(str(run), "sample")


# ---------------------------------------------------------------------------- the captioned digits
def test_a_captioned_teacher_of_other_sizes_is_distilled_with_its_own_text_encoder(tmp_path, monkeypatch):
  """A teacher trained with ``head_dim=16`` (pooled conditions of 32) distils under the default
  config (``head_dim=32``): the conditions come from the text encoder the teacher stored."""
  from one_path_cases import captioned_setup  # pylint: disable=import-outside-toplevel
  from dimo_jax.families import captioned_digits  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import distill  # pylint: disable=import-outside-toplevel
  small = runs.captioned_config(str(tmp_path), "teacher", 1)
  small.model.head_dim = 16
  small.model.axes_dims_rope = (4, 6, 6)
  small.captions.encoder_width, small.captions.encoder_seed = 16, 5
  folders = captioned_setup(tmp_path / "small", small)
  cfg = runs.captioned_config(str(tmp_path), "distill", 1)
  assert cfg.model.head_dim == 32
  cfg.teacher.checkpoint = folders["teacher"]
  stored = checkpoints_read(folders["teacher"])
  table = captioned_digits.load_captioned(cfg, stored).table
  assert table["pooled"].shape[1] == 32 and table["text"].shape[2] == 16
  # The distillation's condition source feeds the teacher conditions it accepts (the shapes of one
  # teacher call, traced, not run: the whole distillation is test_faults' family runs).
  import jax  # pylint: disable=import-outside-toplevel
  family = captioned_digits.FAMILY
  teacher = family.load_teacher(cfg, str(tmp_path / "d"))
  conds = family.condition_source(cfg, teacher).step_conditions(int(cfg.seed), 0, 8, 1)
  assert conds["gen"]["pooled"].shape == (8, 32) and conds["gen"]["text"].shape[2] == 16
  tokens = np.zeros((8, teacher.model.seq_len), np.int32)
  logits = jax.eval_shape(lambda p: teacher.model.apply({"params": p}, tokens, conds["gen"]), teacher.params)
  assert logits.shape[:2] == (8, teacher.model.seq_len)
  # A full disk: one line before the step is compiled, nothing written.
  _full_disk(monkeypatch, free=4096)
  with pytest.raises(UserError) as e:
    distill.train_distill(cfg, str(tmp_path / "d"))
  assert re.fullmatch(rf"the distillation's checkpoints and the generator needs [0-9.]+ MiB in {tmp_path}/d but "
                      r"only 4.0 KiB is free; free some space or pass a folder on a larger disk", str(e.value))
  assert not os.path.exists(tmp_path / "d" / "checkpoints")


def checkpoints_read(folder):
  from dimo_jax.storage import checkpoints  # pylint: disable=import-outside-toplevel
  return checkpoints.read_config(folder)


# ---------------------------------------------------------------------------- Meissonic's tokenizer
def test_meissonic_refuses_token_ids_beyond_the_text_encoders_embedding(tmp_path):
  """A tokenizer of 67 entries whose end-of-text id is 70, against a text encoder of 68 rows: the
  count fits, the id does not; the networks' loader names the tokenizer, the token and the rows."""
  import jax  # pylint: disable=import-outside-toplevel
  import test_sample_text as t  # pylint: disable=import-outside-toplevel
  from dimo_jax.evaluation import text_to_image  # pylint: disable=import-outside-toplevel
  from dimo_jax.networks import clip_text  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "tokenizer"
  t._write_tokenizer(folder)  # pylint: disable=protected-access
  vocab = json.loads((folder / "vocab.json").read_text())
  assert len(vocab) == 67 and vocab["<|endoftext|>"] == 66
  vocab["<|endoftext|>"] = 70
  (folder / "vocab.json").write_text(json.dumps(vocab))
  enc = clip_text.CLIPTextConfig.tiny(vocab_size=68, projection_dim=32)
  params = jax.device_get(clip_text.CLIPTextModel(enc).init(
      jax.random.key(0), np.zeros((1, enc.max_positions), np.int32))["params"])
  t._write_converted(tmp_path / "text_encoder", "clip-text", enc, params)  # pylint: disable=protected-access
  cfg = _config("meissonic")
  # Stand-ins the path check accepts: the refusal comes before they are read.
  t._write_converted(tmp_path / "transformer", "meissonic", t.TRANSFORMER, {})  # pylint: disable=protected-access
  t._write_converted(tmp_path / "vqvae", "meissonic-vq", t.VQ, {})  # pylint: disable=protected-access
  cfg.meissonic.transformer, cfg.meissonic.vqvae = str(tmp_path / "transformer"), str(tmp_path / "vqvae")
  cfg.meissonic.text_encoder, cfg.meissonic.tokenizer = str(tmp_path / "text_encoder"), str(folder)
  cfg.meissonic.text_dtype = "float32"
  with pytest.raises(UserError, match=r"token '<\|endoftext\|>' has id 70, beyond the 68 rows of the text "
                                      r"encoder's token embedding"):
    text_to_image.load_networks(cfg, 32)


# ---------------------------------------------------------------------------- the HPS / GenEval export
def test_the_export_settings_cover_the_networks_and_refuse_another(tmp_path):
  from dimo_jax.evaluation import t2i_export  # pylint: disable=import-outside-toplevel
  cfg = _config("meissonic")
  for name in ("transformer", "vqvae", "text_encoder", "tokenizer"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "params.msgpack").write_bytes(name.encode() * 10)
    setattr(cfg.meissonic, name, str(tmp_path / name))
  sampler = {"model": "teacher", "steps": 4, "resolution": 32}
  nets = t2i_export.network_record(cfg)
  assert nets["vqvae"]["path"] == str(tmp_path / "vqvae") and nets["dtype"] == "bfloat16"
  path = tmp_path / "out" / "settings.json"
  os.makedirs(path.parent)
  path.write_text(json.dumps({"sampler": sampler, "networks": nets, "suites": {}}))
  written = path.read_bytes()
  assert t2i_export.check_same_run(str(path), sampler, {}, t2i_export.network_record(cfg))["networks"] == nets
  # Another VQ model at the same path: its fingerprint differs.
  (tmp_path / "vqvae" / "params.msgpack").write_bytes(b"another vq model")
  with pytest.raises(ValueError, match=r"was written with other settings \(networks.vqvae.fingerprint\)"):
    t2i_export.check_same_run(str(path), sampler, {}, t2i_export.network_record(cfg))
  (tmp_path / "vqvae" / "params.msgpack").write_bytes(b"vqvae" * 10)
  cfg.meissonic.dtype = "float32"
  with pytest.raises(ValueError, match=r"other settings \(networks.dtype\); its images would mix"):
    t2i_export.check_same_run(str(path), sampler, {}, t2i_export.network_record(cfg))
  with pytest.raises(ValueError, match=r"other settings \(resolution\)"):
    t2i_export.check_same_run(str(path), dict(sampler, resolution=64), {}, nets)
  assert path.read_bytes() == written  # a refused rerun leaves settings.json as it was
  path.write_bytes(written[: len(written) // 2])
  with pytest.raises(ValueError) as e:
    t2i_export.check_same_run(str(path), sampler, {}, nets)
  assert str(e.value).startswith(f"{path} is damaged (truncated or not JSON: ") and len(str(e.value).splitlines()) == 1
  assert "delete the folder to start again" in str(e.value)


# ---------------------------------------------------------------------------- write targets
def test_a_read_only_workdir_is_refused_before_anything_runs(tmp_path, monkeypatch):
  """Every mode, before its first step or load: the captioned distillation before its teacher
  trains, sampling and evaluation before any network is read."""
  from dimo_jax.modes import distill, evaluate, sample, teacher  # pylint: disable=import-outside-toplevel
  work = tmp_path / "work"
  work.mkdir()
  _read_only(monkeypatch, work)
  want = rf"^--workdir {work}: cannot write in {work} \(Permission denied\); pick a folder you can write to"
  with pytest.raises(UserError, match=want):
    distill.train_distill(runs.captioned_config(str(tmp_path), "distill", 1), str(work))
  with pytest.raises(UserError, match=want):
    teacher.train_teacher(runs.classes_config(str(tmp_path), "teacher", 1), str(work))
  assert os.listdir(work) == []
  cfg = _config("meissonic")
  cfg.mode, cfg.sample.prompts, cfg.sample.output = "sample", str(tmp_path / "p.txt"), str(work / "images")
  with pytest.raises(UserError, match=rf"^config.sample.output {work}/images: cannot write in {work} "):
    sample.run_sample(cfg, str(tmp_path))
  cfg = _config("digits")
  cfg.mode, cfg.evaluate.output_dir = "evaluate", str(work)
  with pytest.raises(UserError, match=rf"^config.evaluate.output_dir {work}: cannot write in {work} "):
    evaluate.run_evaluate(cfg, str(tmp_path / "distill"))


def test_a_full_disk_is_one_line_before_the_first_step(tmp_path, monkeypatch):
  from dimo_jax.modes import sample, teacher  # pylint: disable=import-outside-toplevel
  _full_disk(monkeypatch, free=1000)
  with pytest.raises(UserError) as e:
    teacher.train_teacher(runs.classes_config(str(tmp_path), "teacher", 1), str(tmp_path / "t"))
  assert re.fullmatch(rf"the teacher's checkpoints needs [0-9.]+ MiB in {tmp_path}/t but only 1000 bytes is free; "
                      "free some space or pass a folder on a larger disk", str(e.value))
  assert not os.path.exists(tmp_path / "t" / "checkpoints")
  prompts = tmp_path / "p.txt"
  prompts.write_text("a cat\na mat\n")
  cfg = _config("meissonic")
  cfg.mode, cfg.sample.prompts, cfg.sample.resolution = "sample", str(prompts), 64
  with pytest.raises(UserError, match=rf"^config.sample.output needs 24.0 KiB in {tmp_path} but only 1000 bytes"):
    sample.run_sample(cfg, str(tmp_path))
  # The classes: num rows of the stored seq_len (int32 tokens and labels).
  from dimo_jax.storage import checkpoints  # pylint: disable=import-outside-toplevel
  checkpoints.write_config(str(tmp_path / "teacher"), {"dataset": {"seq_len": 255}})
  cfg = _config("digits")
  cfg.mode, cfg.sample.checkpoint, cfg.sample.num = "sample", str(tmp_path / "teacher"), 1024
  cfg.sample.output = str(tmp_path / "s" / "x.npy")
  with pytest.raises(UserError, match=rf"^config.sample.output needs 1.0 MiB in {tmp_path} but only 1000 bytes"):
    sample.run_sample(cfg, str(tmp_path))
