"""storage.preflight (writable folders, free disk and memory, checkpoint sizes) and the workdir lock
that is a folder."""
import collections
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.storage import preflight, workdir_lock
from dimo_jax.storage.checkpoints import UserError


def _chmod_is_enforced(folder) -> bool:
  """False where a read-only folder can still be written (root, some mounts)."""
  probe = folder / "probe_ro"
  probe.mkdir()
  probe.chmod(0o500)
  try:
    (probe / "x").write_text("x")
    return False
  except OSError:
    return True
  finally:
    probe.chmod(0o700)


def test_check_writable(tmp_path, monkeypatch):
  preflight.check_writable(tmp_path / "new" / "deeper", "--workdir")  # made later: its parent is checked
  assert not os.path.exists(tmp_path / "new")
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match=r"--workdir .*file/sub: .*file is a file, not a folder"):
    preflight.check_writable(tmp_path / "file" / "sub", "--workdir")
  def refused(**_):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(preflight.tempfile, "mkstemp", refused)
  with pytest.raises(UserError, match=rf"^--workdir {tmp_path}: cannot write in {tmp_path} \(Permission denied\); "
                     "pick a folder you can write to"):
    preflight.check_writable(tmp_path, "--workdir")


def test_check_writable_on_a_read_only_folder(tmp_path):
  if not _chmod_is_enforced(tmp_path):
    pytest.skip("permission bits are not enforced here (running as root?)")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with pytest.raises(UserError) as err:
      preflight.check_writable(ro / "out", "--config.sample.output")
    assert str(err.value).startswith(f"--config.sample.output {ro / 'out'}: cannot write in {ro}")
    assert len(str(err.value).splitlines()) == 1 and os.listdir(ro) == []
  finally:
    ro.chmod(0o700)


def test_check_free_space(tmp_path, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  seen = []

  def disk_usage(path):
    seen.append(path)
    return usage(10 * 2**30, 9 * 2**30, 3 * 2**20)

  monkeypatch.setattr(preflight.shutil, "disk_usage", disk_usage)
  preflight.check_free_space(tmp_path / "a" / "b", 3 * 2**20, "the checkpoint")
  assert seen == [str(tmp_path)]  # the nearest existing folder
  with pytest.raises(UserError) as err:
    preflight.check_free_space(tmp_path, 3 * 2**20 + 1, "the checkpoint")
  assert str(err.value) == (f"the checkpoint needs 3.0 MiB in {tmp_path} but only 3.0 MiB is free; free some "
                            "space or pass a folder on a larger disk")
  preflight.check_free_space("gs://bucket/run", 2**50, "the checkpoint")  # object stores: not checked


def test_check_write_targets_sums_what_goes_to_one_disk(tmp_path, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10 * 2**30, 9 * 2**30, 3 * 2**20))
  each = 2 * 2**20  # each fits alone, the two together do not
  preflight.check_write_targets([(tmp_path / "ckpt", each, "the checkpoints")])
  with pytest.raises(UserError) as err:
    preflight.check_write_targets([(tmp_path / "ckpt", each, "the checkpoints"),
                                   (tmp_path / "gen", each, "the generator"), ("gs://b/run", 2**50, "remote")])
  assert str(err.value) == (f"the checkpoints and the generator needs 4.0 MiB in {tmp_path} but only 3.0 MiB is "
                            "free; free some space or pass a folder on a larger disk")
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match=r"is a file, not a folder"):  # writability comes first, whatever the size
    preflight.check_write_targets([(tmp_path / "file" / "out", 0, "config.sample.output")])


def test_checkpoint_bytes():
  params = {"a": jnp.zeros((3, 4), jnp.float32), "b": {"c": np.zeros(5, np.int8)},
            "d": jax.ShapeDtypeStruct((2, 8), jnp.bfloat16)}
  raw = 3 * 4 * 4 + 5 + 2 * 8 * 2
  slack, overhead = preflight.CHECKPOINT_SLACK_BYTES, preflight.CHECKPOINT_OVERHEAD
  assert preflight.checkpoint_bytes(params) == int(raw * overhead) + slack
  assert preflight.checkpoint_bytes(params, copies=4) == int(4 * raw * overhead) + slack


def test_check_free_memory(monkeypatch):
  monkeypatch.setattr(preflight, "available_memory", lambda: 2**30)
  preflight.check_free_memory(2**30, "x", "fix")
  with pytest.raises(UserError, match=r"^the table needs 2\.0 GiB of memory but 1\.0 GiB is available; shrink it$"):
    preflight.check_free_memory(2**31, "the table", "shrink it")
  monkeypatch.setattr(preflight, "available_memory", lambda: None)
  preflight.check_free_memory(2**60, "x", "fix")  # unknown: not refused
  assert preflight.human_bytes(512) == "512 bytes" and preflight.human_bytes(1536) == "1.5 KiB"


def test_a_stale_lock_that_is_a_folder(tmp_path):
  folder = tmp_path / workdir_lock.LOCK_FILE
  (folder / "inside").mkdir(parents=True)
  lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0)
  with pytest.raises(UserError) as err:
    lock.acquire()
  assert str(err.value) == (f"{folder} is a folder, not a lock file (no run makes it): move it out of the "
                            f"workdir or delete it (rm -r {folder}), then rerun")
  assert (folder / "inside").is_dir()  # nothing of it removed
  shutil.rmtree(folder)
  for text in ('[1, 2]', '{"pid": "x", "host": "h"}', '{"pid": 1, "heartbeat": "soon"}'):
    folder.write_text(text)
    old = 10**9
    os.utime(folder, (old, old))  # an unreadable record is judged by its age: this one is stale
    with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0):
      assert workdir_lock.WorkdirLock(str(tmp_path)).read()["pid"] == os.getpid()
    assert not folder.exists()


def test_cli_lock_folder_exit_2(tmp_path):
  import subprocess
  import sys
  workdir = tmp_path / "run"
  (workdir / workdir_lock.LOCK_FILE).mkdir(parents=True)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "dimo_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
                         "--config.mode=teacher"], capture_output=True, text=True, cwd=root, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {workdir / workdir_lock.LOCK_FILE} is a folder, not a lock file (no run makes it): move it out of "
      f"the workdir or delete it (rm -r {workdir / workdir_lock.LOCK_FILE}), then rerun")
