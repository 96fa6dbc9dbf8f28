"""One run per workdir: ``<workdir>/run.lock`` names the host and process that hold it and carries
a heartbeat; a lock whose process is gone (on this host) or whose heartbeat is old is stale and is
taken over with a warning; a live one stops a second run at once with one line."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from typing import Optional

from absl import logging
from etils import epath

from dimo_jax.storage.checkpoints import UserError, WorkdirInUse, abspath, atomic_write_bytes, is_remote

LOCK_FILE = "run.lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, ValueError):
    return True  # exists, owned by someone else (or an odd value: assume alive)
  return True


def _valid_record(record) -> bool:
  """True for an object whose ``pid`` (an int) and ``heartbeat`` (a number) are absent or well typed."""
  number = lambda v, kinds: v is None or (isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v))
  return isinstance(record, dict) and number(record.get("pid"), int) and number(record.get("heartbeat"),
                                                                                 (int, float))


_HELD = {}  # lock path -> [WorkdirLock, depth] held by this process


class WorkdirLock:
  """``<workdir>/run.lock``: one run per workdir, held while the run lasts.

  The file names the host and process that hold it and carries a heartbeat (its ``heartbeat``
  field, refreshed every ``heartbeat_s`` by a daemon thread). A lock is stale, and taken over
  with a warning, when its process is gone (same host) or its heartbeat is older than
  ``stale_s`` (another host). Taking a lock is atomic (``O_CREAT | O_EXCL``, a rename for a
  stale one); an object-store workdir (``gs://``) gets a best-effort lock. A second acquisition
  in the same process nests."""

  def __init__(self, workdir, *, heartbeat_s: float = 30.0, stale_s: float = 600.0):
    self.workdir = abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.heartbeat_s = float(heartbeat_s)
    self.stale_s = float(stale_s)
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None

  # ------------------------------------------------------------------ file
  def _record(self) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), "heartbeat": now}

  def read(self) -> Optional[dict]:
    """The lock's record (None without a lock; ``{}`` for an unreadable one)."""
    path = epath.Path(self.path)
    try:
      if not path.exists():
        return None
      record = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
      return None
    except (OSError, ValueError, RecursionError):
      return {}
    return record if _valid_record(record) else {}  # another file: judged by its age as an unreadable one

  def _create(self) -> bool:
    data = json.dumps(self._record()).encode()
    if is_remote(self.path):
      path = epath.Path(self.path)
      if path.exists():
        return False
      path.write_bytes(data)
      return (self.read() or {}).get("token") == self.token
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True

  def stale_reason(self, record: dict) -> Optional[str]:
    """Why ``record``'s holder is gone (None while it may be alive)."""
    if not record:
      age = time.time() - self._mtime()
      return None if age < self.stale_s else f"an unreadable lock file {age:.0f}s old"
    host, pid = record.get("host"), record.get("pid")
    if host == socket.gethostname() and pid is not None:
      if int(pid) == os.getpid() and record.get("token") not in {l.token for l, _ in _HELD.values()}:
        return f"process {pid} on {host} is this process, which does not hold it"
      return None if _pid_alive(int(pid)) else f"process {pid} on {host} is not running"
    age = time.time() - float(record.get("heartbeat") or 0)
    return None if age < self.stale_s else f"its heartbeat is {age:.0f}s old"

  def _mtime(self) -> float:
    try:
      return os.path.getmtime(self.path) if not is_remote(self.path) else time.time()
    except OSError:
      return time.time()

  # ------------------------------------------------------------------ acquire / release
  def acquire(self) -> "WorkdirLock":
    held = _HELD.get(self.path)
    if held is not None:
      held[1] += 1
      return held[0]
    if not is_remote(self.path) and os.path.isdir(self.path):
      raise UserError(f"{self.path} is a folder, not a lock file (no run makes it): move it out of the workdir "
                      f"or delete it (rm -r {self.path}), then rerun")
    for _ in range(3):
      if self._create():
        break
      record = self.read()
      if record is None:
        continue  # released meanwhile
      reason = self.stale_reason(record)
      if reason is None:
        raise WorkdirInUse(
            f"workdir {self.workdir} is in use by another run (host {record.get('host', '?')}, pid "
            f"{record.get('pid', '?')}, since {record.get('started', '?')}): wait for it to finish or use "
            f"another --workdir (if no such run is alive, delete {self.path})")
      aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
      try:
        if is_remote(self.path):
          epath.Path(self.path).unlink()
        else:
          os.rename(self.path, aside)  # atomic: one of two racing runs takes it over
      except FileNotFoundError:
        continue
      if not is_remote(self.path):
        os.remove(aside)
      logging.warning("Took over the stale lock %s (host %s, pid %s: %s).", self.path, record.get("host", "?"),
                      record.get("pid", "?"), reason)
    else:
      raise WorkdirInUse(f"could not take the lock {self.path}; another run keeps taking it. Use another --workdir")
    _HELD[self.path] = [self, 1]
    if self.heartbeat_s > 0:
      self._thread = threading.Thread(target=self._beat, name="dimo-workdir-lock", daemon=True)
      self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        record = self.read()
        if not record or record.get("token") != self.token:
          return  # taken over (or removed by hand)
        record["heartbeat"] = time.time()
        if is_remote(self.path):
          epath.Path(self.path).write_text(json.dumps(record))
        else:
          atomic_write_bytes(self.path, json.dumps(record).encode())
      except Exception:  # pylint: disable=broad-except
        logging.warning("Could not refresh the heartbeat of %s.", self.path)

  def release(self):
    held = _HELD.get(self.path)
    if held is None:
      return
    held[1] -= 1
    if held[1] > 0:
      return
    del _HELD[self.path]
    owner = held[0]
    owner._stop.set()  # pylint: disable=protected-access
    if owner._thread is not None:  # pylint: disable=protected-access
      owner._thread.join(timeout=5)  # pylint: disable=protected-access
    record = owner.read()
    if record and record.get("token") == owner.token:
      try:
        epath.Path(owner.path).unlink()
      except FileNotFoundError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
