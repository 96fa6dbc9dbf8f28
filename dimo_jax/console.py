"""What a run prints: its settings once, progress lines with the ETA, the warnings that concern the
user and the result; the libraries' start-up noise goes to ``<workdir>/log.txt`` instead.

Noise, and where it goes by default:

- TensorFlow's and XLA's C++ log lines (``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 here: warnings and
  errors of the libraries' own C++ code are kept out) and the lines TensorFlow prints while it
  loads (oneDNN, the CPU-feature notice, absl's ``InitializeLog`` note): TensorFlow's first import
  runs with the process's stderr pointed at the log file (``QuietImports``);
- INFO lines of other packages logged through Python's ``logging`` (JAX's TPU-backend probe,
  orbax, clu's ``steps_per_sec`` / ``uptime`` lines): the log file only; their warnings and errors
  still show;
- Python warnings raised inside other packages (deprecations and the like): the log file only;
  warnings raised by this project show.

``--verbose`` (``DIMO_VERBOSE=1``) leaves everything as the libraries print it. Every record,
shown or not, also lands in the log file when the workdir is a local folder.

This module imports nothing of the project, nor JAX or TensorFlow at import time, so that
``quiet_environment`` can run before they load.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import time
import warnings
from typing import Iterable, MutableMapping, Optional

LOG_FILE = "log.txt"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Environment defaults for a quiet start; a value the user set is kept.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow / XLA C++: errors only
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "2",
}
# clu's metric writer also logs these two scalars; the progress line already says steps/s.
_ROUTINE_SCALARS = ("steps_per_sec=", "uptime=")
_LIBRARY_WARNINGS_LOGGER = "dimo_jax.library_warnings"
_PROGRESS = "Setting work unit notes: "


def quiet_environment(verbose: bool = False, environ: Optional[MutableMapping[str, str]] = None) -> dict:
  """Sets ``QUIET_ENV``'s defaults in ``environ`` (default ``os.environ``) unless ``verbose``;
  returns what it set. Call it before TensorFlow or JAX load."""
  environ = os.environ if environ is None else environ
  if verbose:
    return {}
  added = {k: v for k, v in QUIET_ENV.items() if k not in environ}
  environ.update(added)
  return added


def _from_project(path: str) -> bool:
  return bool(path) and os.path.abspath(path).startswith(_PACKAGE_DIR + os.sep)


class LibraryFilter(logging.Filter):
  """Keeps the project's own records, the progress and metric lines of the training loop (clu) and
  every other package's warnings and errors; drops the rest (the INFO lines of other packages)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == _LIBRARY_WARNINGS_LOGGER:
      return False
    if _from_project(record.pathname) or record.name.startswith("dimo_jax"):
      return True
    path = (record.pathname or "").replace(os.sep, "/")
    if "/clu/" in path:
      return not record.getMessage().split("] ", 1)[-1].startswith(_ROUTINE_SCALARS)
    return record.levelno >= logging.WARNING


class ShortFormatter(logging.Formatter):
  """``HH:MM:SS message``; warnings and errors say so (``HH:MM:SS WARNING: message``)."""

  def format(self, record: logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
    message = record.getMessage()
    if message.startswith(_PROGRESS):  # clu's progress report
      message = "progress: " + message[len(_PROGRESS):]
    text = f"{stamp} {level}{message}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


def _file_handler(path: str) -> Optional[logging.Handler]:
  try:
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
  except OSError:
    return None
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  handler.setLevel(logging.DEBUG)
  return handler


def log_path(workdir: Optional[str]) -> Optional[str]:
  """``<workdir>/log.txt`` when the workdir is (or can be made) a local folder, else None."""
  if not workdir or "://" in workdir or os.path.isfile(workdir):
    return None
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError:
    return None
  return os.path.join(workdir, LOG_FILE)


@contextlib.contextmanager
def native_stderr_to(path: Optional[str]):
  """Points the process's stderr (file descriptor 2, where C++ libraries write) at ``path``
  (appending; ``os.devnull`` when None) inside the block. Python's own ``sys.stderr`` is flushed
  on both sides; if the block raises, what was captured is printed to the real stderr first."""
  sys.stderr.flush()
  saved = os.dup(2)
  target = path or os.devnull
  fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  start = os.fstat(fd).st_size if path else 0
  os.dup2(fd, 2)
  try:
    yield
  except BaseException:
    sys.stderr.flush()
    os.dup2(saved, 2)
    if path:
      with open(path, "rb") as f:
        f.seek(start)
        os.write(2, f.read())
    raise
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(fd)


class _QuietLoader(importlib.abc.Loader):
  """Runs another loader's ``exec_module`` with the native stderr sent to the log."""

  def __init__(self, inner, path: Optional[str]):
    self.inner, self.path = inner, path

  def create_module(self, spec):
    return self.inner.create_module(spec)

  def exec_module(self, module):
    with native_stderr_to(self.path):
      self.inner.exec_module(module)

  def __getattr__(self, name):
    return getattr(self.inner, name)


class QuietImports(importlib.abc.MetaPathFinder):
  """A ``sys.meta_path`` entry: the first import of each of ``names`` (and everything it imports
  while it loads) runs with the native stderr sent to ``path``: TensorFlow's start-up lines leave
  the terminal only when, and if, something loads TensorFlow."""

  def __init__(self, names: Iterable[str], path: Optional[str]):
    self.names, self.path, self._busy = set(names), path, False

  def find_spec(self, fullname, path=None, target=None):
    if fullname not in self.names or self._busy:
      return None
    self._busy = True
    try:
      spec = importlib.util.find_spec(fullname)
    finally:
      self._busy = False
    if spec is None or spec.loader is None:
      return None
    spec.loader = _QuietLoader(spec.loader, self.path)
    return spec


class _WarningRouter:
  """``warnings.showwarning``: warnings raised in the project's files are shown as usual, the others
  go to the log file (dropped when there is none)."""

  def __init__(self, shown, logger: logging.Logger):
    self.shown, self.logger = shown, logger

  def __call__(self, message, category, filename, lineno, file=None, line=None):
    if _from_project(filename):
      self.shown(message, category, filename, lineno, file, line)
    else:
      self.logger.warning("%s:%d: %s: %s", filename, lineno, category.__name__, message)


class Console:
  """What ``setup`` changed, to undo it (tests) with ``close``."""

  def __init__(self):
    self.undo = []
    self.log_file: Optional[str] = None

  def close(self):
    while self.undo:
      self.undo.pop()()


def setup(workdir: Optional[str] = None, verbose: bool = False, handler: Optional[logging.Handler] = None,
          quiet_imports: Iterable[str] = ("tensorflow",)) -> Console:
  """Quiets the libraries for a run in ``workdir`` (module docstring); ``handler`` is the one that
  prints to the terminal (default: absl's when absl is loaded). ``quiet_imports``: modules whose
  first import prints start-up lines from native code (``QuietImports``). With ``verbose`` nothing
  changes but the log file. Returns a ``Console`` whose ``close`` undoes it."""
  con = Console()
  root = logging.getLogger()
  con.log_file = log_path(workdir)
  file_handler = _file_handler(con.log_file) if con.log_file else None
  if file_handler is not None:
    root.addHandler(file_handler)
    con.undo.append(lambda: (root.removeHandler(file_handler), file_handler.close()))
  if verbose:
    return con
  added = quiet_environment()
  con.undo.append(lambda: [os.environ.pop(k, None) for k in added])
  if handler is None:
    absl_logging = sys.modules.get("absl.logging")
    handler = absl_logging.get_absl_handler() if absl_logging is not None else None
  if handler is not None:
    keep_filter = LibraryFilter()
    target = getattr(handler, "python_handler", handler)
    target_format = target.formatter
    handler.addFilter(keep_filter)
    target.setFormatter(ShortFormatter())
    con.undo.append(lambda: (handler.removeFilter(keep_filter), target.setFormatter(target_format)))
  quiet = logging.getLogger(_LIBRARY_WARNINGS_LOGGER)
  quiet.propagate = False
  if file_handler is not None:
    quiet.addHandler(file_handler)
    con.undo.append(lambda: quiet.removeHandler(file_handler))
  shown = warnings.showwarning
  warnings.showwarning = _WarningRouter(shown, quiet)
  con.undo.append(lambda: setattr(warnings, "showwarning", shown))
  finder = QuietImports([m for m in quiet_imports if m not in sys.modules], con.log_file)
  sys.meta_path.insert(0, finder)
  con.undo.append(lambda: sys.meta_path.remove(finder) if finder in sys.meta_path else None)
  return con


def settings_line(mode: str, config_file: str, workdir: str, overrides: Iterable[str], log_file: Optional[str]) -> str:
  """The one line a run prints first: its mode, config file, workdir, the command line's overrides
  and where the library log goes."""
  given = " ".join(overrides)
  text = f"dimo_jax {mode or '?'}: --config={config_file} --workdir={workdir}"
  text += f" {given}" if given else " (config file defaults)"
  if log_file:
    text += f"; library log: {log_file} (--verbose prints it here)"
  return text
