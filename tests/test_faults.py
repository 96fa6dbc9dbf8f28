"""Faults through the modes and the command line: one run per workdir, a resume that refuses a
changed config, non-finite values that the step guards, damaged checkpoints, a full disk, and the
command line's one-line errors and exit codes. Tiny token configs (8 tokens of 6 codes)."""
import contextlib
import errno
import glob
import json
import logging as std_logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import family_runs
from configs import tokens as tokens_config
from dimo_jax import main as cli
from dimo_jax.modes import distill, loop, teacher
from dimo_jax.storage import checkpoints, loaders, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = family_runs.K
_data = family_runs.token_data  # 64 sequences of 8 tokens over 6 codes, the label first


def _config(data, mode="teacher", steps=4):
  tok, lab = data
  c = tokens_config.get_config()
  c.mode = mode
  c.data.path, c.data.labels = tok, lab
  c.model.width, c.model.depth, c.model.heads, c.model.mlp_dim = 16, 1, 2, 32
  c.train.steps, c.train.batch_size, c.train.warmup_steps = steps, 8, 1
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every, c.train.keep_checkpoints = 2, 0, 2, 3
  c.distill.steps, c.distill.batch_size, c.distill.warmup_steps, c.distill.aux_updates = steps, 8, 1, 1
  c.distill.log_every, c.distill.checkpoint_every, c.distill.keep_checkpoints = 2, 2, 3
  c.distill.sample_every, c.distill.evaluate_at_end = 0, False
  return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return _data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  teacher.train_teacher(_config(data, steps=2), workdir)
  return workdir


def _distill_config(data, teacher_path, steps=4):
  c = _config(data, "distill", steps)
  c.teacher.checkpoint = teacher_path
  return c


@pytest.fixture
def absl_warnings():
  """The warning lines absl logging writes during a test."""
  records = []

  class Keep(std_logging.Handler):
    def emit(self, record):
      if record.levelno >= std_logging.WARNING:
        records.append(record.getMessage())

  handler = Keep()
  std_logging.getLogger("absl").addHandler(handler)
  yield records
  std_logging.getLogger("absl").removeHandler(handler)


# ---------------------------------------------------------------------------- one run per workdir
def _lock_record(workdir, host, pid, heartbeat):
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump({"host": host, "pid": pid, "token": "other", "started": "2025-01-01 00:00:00",
               "heartbeat": heartbeat}, f)


def test_a_live_lock_stops_a_second_run_at_once(tmp_path, data):
  workdir = str(tmp_path / "run")
  with _held(workdir) as holder:
    with pytest.raises(checkpoints.WorkdirInUse) as e:
      teacher.train_teacher(_config(data), workdir)
    assert str(e.value) == (
        f"workdir {workdir} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, since "
        f"2025-01-01 00:00:00): wait for it to finish or use another --workdir (if no such run is alive, "
        f"delete {workdir}/run.lock)")
    assert not os.path.isdir(os.path.join(workdir, "checkpoints"))  # nothing was written
    # Another host's lock with a fresh heartbeat holds too.
    _lock_record(workdir, "another-host", 1, time.time())
    with pytest.raises(checkpoints.WorkdirInUse, match="host another-host, pid 1"):
      teacher.train_teacher(_config(data), workdir)


@contextlib.contextmanager
def _held(workdir):
  """``workdir`` locked by a live process of this host (yielded) for the body."""
  os.makedirs(workdir, exist_ok=True)
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _lock_record(workdir, socket.gethostname(), holder.pid, time.time())
    yield holder
  finally:
    holder.kill()
    holder.wait()


def test_stale_locks_are_taken_over(tmp_path, absl_warnings):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _lock_record(workdir, socket.gethostname(), dead.pid, time.time())
  with loop.workdir_lock(workdir):
    held = json.load(open(os.path.join(workdir, "run.lock")))
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
  assert not os.path.exists(os.path.join(workdir, "run.lock"))  # released
  assert (f"Took over the stale lock {workdir}/run.lock (host {socket.gethostname()}, pid {dead.pid}: "
          f"process {dead.pid} on {socket.gethostname()} is not running).") in absl_warnings
  # Another host whose heartbeat stopped an hour ago.
  _lock_record(workdir, "another-host", 1, time.time() - 3600)
  with workdir_lock.WorkdirLock(workdir, heartbeat_s=0):
    assert json.load(open(os.path.join(workdir, "run.lock")))["pid"] == os.getpid()
  assert any(w.startswith(f"Took over the stale lock {workdir}/run.lock (host another-host, pid 1: its heartbeat "
                          "is 36") for w in absl_warnings)
  # The heartbeat moves while the run holds the lock.
  lock = workdir_lock.WorkdirLock(workdir, heartbeat_s=0.05)
  with lock:
    first = json.load(open(lock.path))["heartbeat"]
    time.sleep(0.5)
    assert json.load(open(lock.path))["heartbeat"] > first


def _cli_env():
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def test_two_processes_on_one_workdir_and_a_preempted_run(tmp_path, data):
  """A second run on a busy workdir stops at once (exit 2, one line); SIGTERM stops the first one
  with a checkpoint and exit status 75."""
  tok, lab = data
  workdir = str(tmp_path / "run")
  argv = [sys.executable, "-m", "dimo_jax.main", "--config=configs/tokens.py", f"--workdir={workdir}",
          f"--config.data.path={tok}", f"--config.data.labels={lab}", "--config.model.width=16",
          "--config.model.depth=1", "--config.model.heads=2", "--config.model.mlp_dim=32",
          "--config.train.steps=100000", "--config.train.batch_size=8", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.checkpoint_every=100000"]
  log = open(tmp_path / "first.log", "w")
  first = subprocess.Popen(argv, cwd=ROOT, env=_cli_env(), stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 150
    while "train/loss" not in open(tmp_path / "first.log").read():  # the first run is in its loop
      assert first.poll() is None and time.time() < deadline, open(tmp_path / "first.log").read()[-3000:]
      time.sleep(0.5)
    second = subprocess.run(argv, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=150)
    assert second.returncode == 2
    lines = [l for l in second.stderr.splitlines() if l.strip()]
    assert lines[-1] == (
        f"error: workdir {workdir} is in use by another run (host {socket.gethostname()}, pid {first.pid}, "
        f"since {json.load(open(os.path.join(workdir, 'run.lock')))['started']}): wait for it to finish or use "
        f"another --workdir (if no such run is alive, delete {workdir}/run.lock)")
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == cli.EXIT_PREEMPTED == 75
  finally:
    if first.poll() is None:
      first.kill()
    log.close()
  steps = os.listdir(os.path.join(workdir, "checkpoints"))
  assert len(steps) == 1 and int(steps[0]) > 0  # the preempted run wrote its checkpoint
  assert not os.path.exists(os.path.join(workdir, "run.lock"))


# ---------------------------------------------------------------------------- resume checks
def test_resume_refuses_a_changed_run_and_accepts_named_changes(tmp_path, data, teacher_dir, absl_warnings):
  workdir = str(tmp_path / "dimo")
  c = _distill_config(data, teacher_dir, steps=2)
  distill.train_distill(c, workdir)
  other = str(tmp_path / "other_teacher")
  shutil.copytree(teacher_dir, other)
  c2 = _distill_config(data, other, steps=2)
  c2.distill.divergence = "rkl"
  with pytest.raises(checkpoints.UserError) as e:
    distill.train_distill(c2, workdir)
  assert str(e.value) == (
      f"--workdir={workdir} holds a distill run with another config, and resuming would mix the two: "
      f"distill.divergence: 'fkl' -> 'rkl'; teacher.checkpoint: {teacher_dir!r} -> {other!r}.\n"
      "Use a new --workdir, or accept the changes with --config.resume_accept=distill.divergence,teacher.checkpoint")
  # More steps: refused by default, accepted when named.
  c3 = _distill_config(data, teacher_dir, steps=4)
  with pytest.raises(checkpoints.UserError, match=r"distill.steps: 2 -> 4\.\n.*--config.resume_accept=distill.steps$"):
    distill.train_distill(c3, workdir)
  with c3.unlocked():
    c3.resume_accept = "steps,log_every"
  out = distill.train_distill(c3, workdir)
  assert out["step"] == 4
  assert any("Resuming " + workdir + " with accepted config changes: distill.steps: 2 -> 4." in w
             for w in absl_warnings)
  # A teacher workdir resumed with another model is refused as well.
  t = _config(data, steps=2)
  t.model.width = 32
  with pytest.raises(checkpoints.UserError, match=r"model.width: 16 -> 32"):
    teacher.train_teacher(t, teacher_dir)


# ---------------------------------------------------------------------------- non-finite values
def _nan_teacher(teacher_dir, folder):
  """The teacher with NaN in its null-class embedding row: only guidance reads it."""
  params, ema, stored = checkpoints.load_params(teacher_dir)
  bad = jax.tree_util.tree_map(np.array, ema)
  bad["tok_emb"]["embedding"][K + 2 + 1] = np.nan  # codes, mask, 2 classes, null
  checkpoints.save_params(folder, jax.tree_util.tree_map(np.asarray, params), stored, ema_params=bad, step=2)
  return folder


def test_nan_in_the_teacher_is_named_at_load_and_never_stops_a_guarded_run(tmp_path, data, teacher_dir,
                                                                          absl_warnings):
  bad = _nan_teacher(teacher_dir, str(tmp_path / "nan_teacher"))
  _, params, _ = loaders.load_teacher(bad)
  assert loaders.first_nonfinite(params) == ("tok_emb/embedding", 16, 160)
  assert (f"the teacher in {bad} has non-finite parameters: tok_emb/embedding holds 16 of 160 values that are "
          "NaN or infinite (the first such leaf); its outputs will be non-finite where it is used. Retrain or "
          "reconvert it.") in absl_warnings
  # With guidance the teacher's logits are NaN; the step zeroes the token gradients: the run goes on
  # to its end, non-finite logged metrics are warned about, and the generator's gradients stay finite.
  c = _distill_config(data, bad, steps=4)
  c.teacher.guidance = 2.0
  out = distill.train_distill(c, str(tmp_path / "guarded"))
  assert out["step"] == 4 and out["gen/nan_count"] > 0 and np.isfinite(out["gen/grad_norm"])
  assert any(w.startswith("Step 4: non-finite ") and w.endswith(
      ". The run goes on (the step zeroes non-finite gradients) and stops after "
      "config.distill.max_nonfinite_steps consecutive steps with any.") for w in absl_warnings)
  _, gen, _ = loaders.load_generator(str(tmp_path / "guarded"))
  gen["tok_emb"]["embedding"] = gen["tok_emb"]["embedding"][: K + 2 + 1]  # the row copied from the teacher
  assert loaders.first_nonfinite(gen) is None
  # ... until max_nonfinite_steps consecutive steps had non-finite gradients.
  c = _distill_config(data, bad, steps=8)
  c.teacher.guidance = 2.0
  with c.unlocked():
    c.distill.max_nonfinite_steps = 3
  workdir = str(tmp_path / "stopped")
  with pytest.raises(loop.NonFiniteStop) as e:
    distill.train_distill(c, workdir)
  assert str(e.value) == (
      "distill: 3 consecutive steps (1 to 3) had non-finite gradients (config.distill.max_nonfinite_steps=3); "
      f"stopped, kept: the checkpoint at step 2 in {workdir}/checkpoints (a rerun resumes from it). Check the "
      "teacher for non-finite values, lower --config.distill.gen_lr, or raise --config.distill.max_nonfinite_steps "
      "(0 never stops)")


# ---------------------------------------------------------------------------- damaged checkpoints
def _truncate_data(step_dir):
  """Cuts every data file of a checkpoint step to a third, as a copy that stopped midway."""
  files = [f for f in glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  assert files
  for name in files:
    with open(name, "r+b") as f:
      f.truncate(os.path.getsize(name) // 3)


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes(tmp_path, data, absl_warnings):
  workdir = str(tmp_path / "run")
  ckdir = os.path.join(workdir, "checkpoints")
  part = teacher.train_teacher(_config(data, steps=6), workdir, stop_after=4)
  assert part["step"] == 4 and sorted(os.listdir(ckdir)) == ["2", "4"]
  _truncate_data(os.path.join(ckdir, "4"))
  out = teacher.train_teacher(_config(data, steps=6), workdir)
  assert out["step"] == 6
  assert sorted(os.listdir(ckdir)) == ["2", "4", "4.corrupt-1", "6"]  # 4 again from the resumed run
  moved = [w for w in absl_warnings if w.startswith("Checkpoint step 4 in ")]
  assert len(moved) == 1 and moved[0].startswith(f"Checkpoint step 4 in {ckdir} is unreadable (")
  assert moved[0].endswith(f"); moved it to {ckdir}/4.corrupt-1 and trying the next older one.")
  # An emptied metadata file: the same, with the next free name.
  open(os.path.join(ckdir, "6", "params", "_METADATA"), "w").close()
  again = teacher.train_teacher(_config(data, steps=6), workdir)
  assert again["step"] == 6 and os.path.isdir(os.path.join(ckdir, "6.corrupt-1"))


def test_no_intact_checkpoint_names_the_folder(tmp_path):
  ckdir = str(tmp_path / "checkpoints")
  state = {"params": {"w": jnp.arange(300.0)}, "step": jnp.int32(0)}
  with checkpoints.Checkpointer(ckdir, max_to_keep=None) as ckpt:
    ckpt.save(1, state, force=True)
    ckpt.save(2, state, force=True)
  _truncate_data(os.path.join(ckdir, "2"))
  open(os.path.join(ckdir, "1", "params", "_METADATA"), "w").close()
  with checkpoints.Checkpointer(ckdir, max_to_keep=None) as ckpt:
    with pytest.raises(checkpoints.CheckpointUnreadable) as e:
      ckpt.restore_latest(state)
  assert str(e.value) == (f"no intact checkpoint in {ckdir}: every step was unreadable and is moved aside "
                          "(2.corrupt-1, 1.corrupt-1); rerun to start again from step 0, or use another --workdir")
  assert sorted(os.listdir(ckdir)) == ["1.corrupt-1", "2.corrupt-1"]  # nothing deleted
  # A structure that does not match is not damage: nothing is moved.
  with checkpoints.Checkpointer(str(tmp_path / "ok"), max_to_keep=None) as ckpt:
    ckpt.save(1, state, force=True)
    with pytest.raises(ValueError, match="does not match the target structure"):
      ckpt.restore_latest({"params": {"v": jnp.zeros(300)}, "step": jnp.int32(0)})
  assert os.listdir(str(tmp_path / "ok")) == ["1"]


def test_a_full_disk_stops_with_one_message(tmp_path, data, monkeypatch):
  workdir = str(tmp_path / "run")
  ckdir = os.path.join(workdir, "checkpoints")
  real_save = checkpoints.ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= 4:
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "{ckdir}/4": '
                       "Failed to write 26705 bytes to file 4: No space left on device [os_error=28]")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", save)
  with pytest.raises(checkpoints.DiskFull) as e:
    teacher.train_teacher(_config(data, steps=6), workdir)
  assert str(e.value) == (
      f"no space left on device while writing {ckdir}/4; kept: the checkpoint at step 2 in {ckdir} (a rerun "
      "resumes from it). Free space (or use a --workdir on a larger disk) and rerun the same command")
  assert not os.path.exists(os.path.join(workdir, "run.lock"))
  # config.json and other small files: the path and what is kept.
  def replace(src, dst):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(checkpoints.os, "replace", replace)
  with pytest.raises(checkpoints.DiskFull) as e:
    checkpoints.write_config(workdir, {"a": 1})
  assert str(e.value) == (f"no space left on device while writing {workdir}/config.json; the previous version "
                          "(if any) is kept. Free space and rerun the same command")


# ---------------------------------------------------------------------------- the command line
def _argv(data, workdir, *extra, config="configs/tokens.py"):
  tok, lab = data
  return ["dimo_jax.main", f"--config={ROOT}/{config}", f"--workdir={workdir}", f"--config.data.path={tok}",
          f"--config.data.labels={lab}", *extra]


def _run(argv):
  config, workdir, given = cli.parse(argv)
  return cli.run(config, workdir, given)


def test_an_unknown_key_names_the_flag_in_one_line(tmp_path, data):
  with pytest.raises(checkpoints.UserError) as e:
    cli.parse(_argv(data, tmp_path, "--config.distill.nonsense=1"))
  assert str(e.value) == (f"unknown config key in --config.distill.nonsense=1: {ROOT}/configs/tokens.py has no "
                          f"field 'nonsense' in config.distill; see {ROOT}/configs/tokens.py for the fields")
  with pytest.raises(checkpoints.UserError, match=r"no field 'stepz' in config.distill; did you mean "
                                                  r"--config.distill.steps\?$"):
    cli.parse(_argv(data, tmp_path, "--config.distill.stepz=3"))
  with pytest.raises(checkpoints.UserError, match=r"^flag --config.distill.steps=abc: invalid literal"):
    cli.parse(_argv(data, tmp_path, "--config.distill.steps=abc"))
  # Through the command line: exit status 2, one line, no traceback (unless --verbose).
  argv = [sys.executable, "-m", "dimo_jax.main", "--config=configs/tokens.py", f"--workdir={tmp_path}",
          "--config.distill.nonsense=1"]
  proc = subprocess.run(argv, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=150)
  assert proc.returncode == cli.EXIT_USER_ERROR == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: unknown config key in --config.distill.nonsense=1: configs/tokens.py has no field 'nonsense' in "
      "config.distill; see configs/tokens.py for the fields")
  assert "Traceback" not in proc.stderr
  proc = subprocess.run(argv, cwd=ROOT, env=dict(_cli_env(), DIMO_VERBOSE="1"), capture_output=True, text=True,
                        timeout=150)
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_settings_the_config_file_lacks_and_model_flags_distillation_cannot_honour(tmp_path, data, teacher_dir):
  config, _, given = cli.parse(_argv(data, tmp_path, "--config.resume_accept=steps,log_every",
                                     "--config.distill.max_nonfinite_steps=7"))
  assert config.resume_accept == "steps,log_every" and config.distill.max_nonfinite_steps == 7
  with pytest.raises(checkpoints.UserError) as e:
    _run(_argv(data, tmp_path / "d", "--config.mode=distill", f"--config.teacher.checkpoint={teacher_dir}",
               "--config.model.width=32", "--config.model.depth=3", "--config.model.dtype=float32"))
  assert str(e.value) == (
      "--config.model.depth, --config.model.width cannot apply in mode=distill: the networks are rebuilt from the "
      "stored config.json of the teacher or generator. Drop the flag; only model.dtype, model.param_dtype, "
      "model.logits_dtype, model.remat, model.attention_impl, model.scan, model.dropout apply in this mode")


def test_workdir_a_file_or_read_only(tmp_path, data, monkeypatch):
  afile = tmp_path / "afile"
  afile.write_text("")
  with pytest.raises(ValueError) as e:
    cli.run(_config(data), str(afile))
  assert str(e.value) == f"--workdir={afile} is a file, not a folder; pass a folder (it is created when missing)"
  with pytest.raises(ValueError) as e:
    cli.run(_config(data), str(afile / "sub"))
  assert str(e.value) == f"--workdir={afile}/sub cannot be created: {afile} is a file; pass a folder path"
  locked = tmp_path / "readonly"
  locked.mkdir()
  locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.geteuid() == 0:  # root writes anyway: the check reads the permission bits
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if os.fspath(p) == str(locked) else real(p, m))
  try:
    with pytest.raises(ValueError) as e:
      cli.run(_config(data), str(locked))
  finally:
    locked.chmod(0o755)
  assert str(e.value) == (f"--workdir={locked} is not writable; choose a folder you can write (or fix its "
                          "permissions)")


def test_data_files_that_are_not_npy_files(tmp_path, data):
  text = tmp_path / "tokens.npy"
  text.write_text("1 2 3\n4 5 6\n")
  with pytest.raises(ValueError) as e:
    cli.run(_config((str(text), "")), str(tmp_path / "w"))
  assert str(e.value) == (f"Tokens file '{text}' is not a NumPy .npy file (it starts with b'1 2 3\\n': a text "
                          "file). Save the array with np.save(path, arr.astype(np.int32)).")
  folder = tmp_path / "folder.npy"
  folder.mkdir()
  with pytest.raises(IsADirectoryError) as e:
    cli.run(_config((str(folder), "")), str(tmp_path / "w"))
  assert str(e.value) == (f"Tokens path '{folder}' is a directory, not a .npy file. Point data.path / data.labels "
                          "in the config at the file inside it.")


def test_sampling_a_teacher_as_a_generator_fails_clearly(tmp_path, data, teacher_dir):
  c = _config(data, "sample")
  c.sample.model, c.sample.checkpoint = "generator", teacher_dir
  with pytest.raises(ValueError) as e:
    cli.run(c, str(tmp_path))
  assert str(e.value) == (
      f"{teacher_dir} holds a teacher, not a one-step generator (its config.json has no role 'generator'): sample "
      "it with --config.sample.model=teacher, or point --config.sample.checkpoint at a distillation workdir")


def test_the_maskgit_config_before_conversion_names_both_convert_commands(tmp_path, monkeypatch):
  from configs import maskgit
  monkeypatch.chdir(tmp_path)  # no pretrained/ folders here
  with pytest.raises(FileNotFoundError) as e:
    cli.run(maskgit.get_config("1"), str(tmp_path / "dimo"))
  assert str(e.value) == (
      "config.teacher.checkpoint 'pretrained/maskgit_teacher' and config.vqgan.checkpoint 'pretrained/vqgan_taming' "
      "are not converted yet; convert the published files first:\n"
      "  python -m dimo_jax.convert valeoai --input=MaskGIT_ImageNet_256.pth --output=pretrained/maskgit_teacher "
      "--heads=16\n"
      "  python -m dimo_jax.convert taming-vqgan --input=VQGAN/last.ckpt --output=pretrained/vqgan_taming")


def test_output_files_get_the_users_umask(tmp_path, data, teacher_dir):
  from dimo_jax.modes import sample
  old = os.umask(0o002)
  try:
    checkpoints.write_config(tmp_path / "run", {"a": 1})
    paths = sample.output_paths(str(tmp_path / "s" / "out.npy"), str(tmp_path))
    sample.write_outputs(np.zeros((2, 8), np.int32), np.zeros(2, np.int32), paths, vocab_size=K,
                         image_shape=(2, 4))
  finally:
    os.umask(old)
  for path in (tmp_path / "run" / "config.json", paths["tokens"], paths["labels"], paths["image"]):
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o664, path


# ---------------------------------------------------------------------------- every family
@pytest.fixture(scope="module")
def family_teachers(tmp_path_factory):
  """The tiny teachers of ``family_runs`` (two steps; Meissonic's is the converted transformer)."""
  import family_runs as runs  # pylint: disable=import-outside-toplevel
  folder = str(tmp_path_factory.mktemp("families"))

  def path(family):  # trained on first use
    out = os.path.join(folder, family, "teacher")
    if not os.path.isdir(out):
      teacher.train_teacher(runs.CONFIGS[family](os.path.join(folder, family), "teacher", runs.STEPS), out)
    return out
  return folder, path


def _family_distill(family_teachers, family, teacher_path=None):
  import family_runs as runs  # pylint: disable=import-outside-toplevel
  folder, teachers = family_teachers
  c = runs.CONFIGS[family](os.path.join(folder, family), "distill", runs.STEPS)
  if family != "meissonic":
    c.teacher.checkpoint = teacher_path or teachers(family)
  elif teacher_path:
    c.meissonic.transformer = teacher_path
  return c


@pytest.mark.parametrize("family", ["classes", "captioned_digits", "meissonic"])
def test_every_family_holds_its_workdir_resumes_after_sigterm_and_refuses_another_teacher(
    tmp_path, family_teachers, family, monkeypatch):
  """A held workdir stops a second run at once (exit status 2); SIGTERM after the first step
  writes a checkpoint and returns ``preempted`` (exit status 75); the rerun resumes and ends with
  the generator of an uninterrupted run (the golden fingerprint of ``test_one_path``); a rerun
  with another teacher is refused."""
  import family_runs as runs  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "dimo")
  with _held(workdir):
    with pytest.raises(checkpoints.WorkdirInUse) as e:
      distill.train_distill(_family_distill(family_teachers, family), workdir)
    assert isinstance(e.value, cli.user_errors())  # the command line's exit status 2
  os.remove(os.path.join(workdir, "run.lock"))

  real_progress = loop.create_progress

  def progress_then_sigterm(*args, **kwargs):
    report = real_progress(*args, **kwargs)
    def on_step(step):
      report(step)
      if step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return on_step
  monkeypatch.setattr(loop, "create_progress", progress_then_sigterm)
  out = distill.train_distill(_family_distill(family_teachers, family), workdir)
  assert out["preempted"] and out["step"] == 1
  assert [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()] == ["1"]
  assert not os.path.exists(os.path.join(workdir, "generator"))
  monkeypatch.setattr(loop, "create_progress", real_progress)

  other = str(tmp_path / "other_teacher")
  source = (family_teachers[1](family) if family != "meissonic"
            else _family_distill(family_teachers, family).meissonic.transformer)
  shutil.copytree(source, other)
  with pytest.raises(checkpoints.UserError, match=r"teacher.checkpoint|meissonic.transformer"):
    distill.train_distill(_family_distill(family_teachers, family, other), workdir)

  out = distill.train_distill(_family_distill(family_teachers, family), workdir)
  assert out["step"] == runs.STEPS and not out["preempted"]
  with np.load(os.path.join(ROOT, "tests", "data", "family_steps_golden.npz")) as g:
    want = runs.from_arrays(g, f"{family}/generator")
  assert runs.folder_fingerprint(os.path.join(workdir, "generator")) == want
