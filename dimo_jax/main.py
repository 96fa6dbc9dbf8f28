"""Command line: ``python -m dimo_jax.main --config=configs/<file>.py --workdir=<dir> [--config.key=value]``.

The mode is the config field ``mode`` (``--config.mode=teacher``); each mode is one module of
``dimo_jax.modes`` with a ``run(config, workdir)`` function: ``teacher`` trains a masked
diffusion model, ``distill`` runs Di[M]O, ``sample`` draws samples and ``evaluate`` scores them.

Two settings exist whether or not the config file defines them: ``--config.resume_accept=<keys>``
(config changes a resumed run accepts, e.g. ``distill.steps``) and
``--config.distill.max_nonfinite_steps=<n>``. ``--verbose`` (or ``DIMO_VERBOSE=1``) shows the
traceback of every error and every library's log lines, which otherwise go to ``<workdir>/log.txt``
(``dimo_jax.console``).

Exit status: 0 the run finished (or stopped where ``stop_after`` asked); 2 an error in what was
given (config, data, files, workdir, a workdir held by another run, a changed config on resume,
no intact checkpoint, a full disk, a run stopped on non-finite values): one or two lines on
stderr naming the key, file or value and the fix; 75 (EX_TEMPFAIL) SIGTERM stopped the run
after it wrote its checkpoint: rerun the same command to resume; 1 an unexpected error (a bug),
with its traceback.
"""
from __future__ import annotations

import difflib
import importlib
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dimo_jax import console

MODES = {
    "teacher": "dimo_jax.modes.teacher",
    "sample": "dimo_jax.modes.sample",
    "distill": "dimo_jax.modes.distill",
    "evaluate": "dimo_jax.modes.evaluate",
}

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped by SIGTERM with a checkpoint; rerun to resume
VERBOSE_ENV = "DIMO_VERBOSE"

# Settings a config file need not define: (type, default).
EXTRA_KEYS = {"resume_accept": (str, ""), "distill.max_nonfinite_steps": (int, 100)}


def user_errors():
  """The exception types reported in one or two lines (no traceback): errors in what the user
  gave or in the files a run found."""
  from dimo_jax.storage.checkpoints import UserError  # pylint: disable=import-outside-toplevel
  return (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
          FileExistsError)


def resolve_mode(mode: str):
  """The ``run`` function of ``mode``'s module; a clear error for an unknown mode."""
  if mode not in MODES:
    raise ValueError(f"unknown config.mode={mode!r}; choose one of {', '.join(MODES)} "
                     "(e.g. --config.mode=teacher)")
  return importlib.import_module(MODES[mode]).run


def run(config, workdir: str, given=()):
  """Runs ``config.mode`` with ``workdir``; returns what the mode returns. ``given``: the config
  keys set on the command line (``model.width``, ...), checked against what the mode honours."""
  if config is None:
    raise ValueError("no config given; pass --config=configs/<file>.py")
  if not workdir:
    raise ValueError("no workdir given; pass --workdir=<dir>")
  mode = config.get("mode", "") if hasattr(config, "get") else ""
  fn = resolve_mode(mode)
  from dimo_jax.modes import loop  # pylint: disable=import-outside-toplevel
  from dimo_jax.storage.checkpoints import UserError  # pylint: disable=import-outside-toplevel
  loop.check_flags(config, mode, given)
  if os.path.isfile(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a folder; pass a folder (it is created when missing)")
  return fn(config, workdir)


def define_flags(flag_values=flags.FLAGS, sys_argv=None):
  """Defines ``--config`` (with ``--config.key=value`` overrides) and ``--workdir``."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py).",
                                           flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.",
                                flag_values=flag_values)
  return config, workdir


_CONFIG, _WORKDIR = define_flags()
flags.DEFINE_bool("verbose", False, f"Show the traceback of every error (also {VERBOSE_ENV}=1).")


# ---------------------------------------------------------------------------- parsing
def is_verbose(argv=()) -> bool:
  return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _override(arg: str):
  """``(key, value)`` of a ``--config.key=value`` argument (value None without ``=``)."""
  if not arg.startswith("--config."):
    return None
  key, _, value = arg[len("--config."):].partition("=")
  return key, (value if "=" in arg else None)


def split_extra(argv):
  """``argv`` without ``--verbose`` and the ``EXTRA_KEYS`` overrides, and those values."""
  kept, extra = [], {}
  for arg in argv:
    item = _override(arg)
    if item is not None and item[0] in EXTRA_KEYS and item[1] is not None:
      kind = EXTRA_KEYS[item[0]][0]
      try:
        extra[item[0]] = kind(item[1])
      except ValueError:
        raise _user_error(f"--config.{item[0]}={item[1]}: expected {kind.__name__}, e.g. "
                          f"--config.{item[0]}={EXTRA_KEYS[item[0]][1] or 'steps'}") from None
    elif arg not in ("--verbose", "--noverbose"):
      kept.append(arg)
  return kept, extra


def given_keys(argv):
  """The config keys overridden on the command line."""
  return [item[0] for item in map(_override, argv) if item is not None]


def _user_error(message: str):
  from dimo_jax.storage.checkpoints import UserError  # pylint: disable=import-outside-toplevel
  return UserError(message)


def _config_file(argv) -> str:
  """The last ``--config=`` value (the one absl keeps)."""
  paths = [arg[len("--config="):] for arg in argv if arg.startswith("--config=")]
  return paths[-1] if paths else ""


def _unknown_key(argv):
  """A message naming the first ``--config.<key>`` override the config file lacks (None when
  every key exists)."""
  path = _config_file(argv)
  if not path:
    return None
  base = [argv[0], f"--config={path}"]
  fv = flags.FlagValues()
  holder, _ = define_flags(fv, sys_argv=base)
  try:
    fv(base)
    config = holder.value
    config.get("mode")
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv[1:]:
    item = _override(arg)
    if item is None:
      continue
    node, walked = config, []
    for part in item[0].split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = "config." + ".".join(walked) if walked else "the config"
        close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
        hint = (f"did you mean --config.{'.'.join(walked + [close[0]])}?" if close
                else f"see {path.split(':')[0]} for the fields")
        return f"unknown config key in {arg}: {path} has no field {part!r} in {where}; {hint}"
      node, walked = node[part], walked + [part]
  return None


def _last_line(text: str) -> str:
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


def parse(argv, flag_values=None):
  """``(config, workdir, given keys)`` from a full command line (``argv[0]`` the program).

  Flag errors (an unknown key, a value of the wrong type, a config file that does not load)
  raise ``UserError`` naming the flag. With ``flag_values`` None the flags are defined afresh
  (tests); ``main`` parses into absl's global flags."""
  return _parse(argv, flag_values)[:3]


def _parse(argv, flag_values):
  argv, extra = split_extra(list(argv))
  if flag_values is None:
    flag_values = flags.FlagValues()
    config_holder, workdir_holder = define_flags(flag_values, sys_argv=argv)
  else:
    config_holder, workdir_holder = _CONFIG, _WORKDIR
    sys.argv[:] = argv  # config_flags finds the overrides to define in sys.argv
  try:
    rest = flag_values(argv)
    config = config_holder.value
    if config is not None:
      config.get("mode")  # a config file that failed to load raises here
  except flags.Error as e:
    text = str(e)
    first = text.splitlines()[0].rstrip(":")
    if "Error whilst parsing config file" in text:
      first = f"{first.split(': Error whilst')[0]}: the config file does not load ({_last_line(text)})"
    raise _user_error(first) from e
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    message = _unknown_key(argv)
    if message is None:
      path = _config_file(argv)
      message = f"--config={path}: the config does not load ({_last_line(e) or type(e).__name__})"
    raise _user_error(message) from e
  if config is not None and extra:
    with config.unlocked():
      for key, value in extra.items():
        section, _, leaf = key.rpartition(".")
        node = config[section] if section else config
        node[leaf] = value
  return config, workdir_holder.value, given_keys(argv), rest


# ---------------------------------------------------------------------------- main
class _QuietLibraries(std_logging.Filter):
  """Drops the checkpoint library's routine INFO and WARNING lines and its own reports of a full
  disk (the run reports that in one line); errors still show, and everything with --verbose."""

  def __init__(self, verbose: bool = False):
    super().__init__()
    self.verbose = verbose

  def filter(self, record):
    if self.verbose or "orbax" not in (record.pathname or ""):
      return True
    if record.levelno < std_logging.ERROR:
      return False
    from dimo_jax.storage.checkpoints import is_disk_full  # pylint: disable=import-outside-toplevel
    err = record.exc_info[1] if record.exc_info else None
    return not ("No space left on device" in record.getMessage() or (err is not None and is_disk_full(err)))


_PARSED = {}


def _parse_flags(argv):
  """absl's flag parser for ``app.run``: a flag error prints one line and exits with 2."""
  verbose = is_verbose(argv)
  try:
    config, workdir, given, rest = _parse(argv, flags.FLAGS)
  except Exception as e:  # pylint: disable=broad-except
    if verbose or not isinstance(e, user_errors()):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  _PARSED.update(config=config, workdir=workdir, given=given, verbose=verbose, config_file=_config_file(argv),
                 overrides=[a for a in argv if _override(a) is not None])
  return rest


def main(argv):
  verbose = _PARSED.get("verbose", is_verbose())
  std_logging.getLogger("absl").addFilter(_QuietLibraries(verbose))
  config, workdir = _PARSED.get("config", _CONFIG.value), _PARSED.get("workdir", _WORKDIR.value)
  out = console.setup(workdir, verbose)
  mode = config.get("mode", "") if hasattr(config, "get") else ""
  logging.info("%s", console.settings_line(mode, _PARSED.get("config_file", ""), workdir,
                                           _PARSED.get("overrides", ()), out.log_file))
  try:
    if len(argv) > 1:
      raise _user_error(f"unexpected arguments {argv[1:]}; settings take the form --config.<key>=<value>")
    result = run(config, workdir, _PARSED.get("given", ()))
  except Exception as e:  # pylint: disable=broad-except
    if verbose or not isinstance(e, user_errors()):
      raise
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  if isinstance(result, dict):
    logging.info("Result: %s", {k: v for k, v in result.items() if not hasattr(v, "shape")})
    if result.get("preempted"):
      print(f"preempted: SIGTERM stopped the run at step {result.get('step')} after it wrote its checkpoint; "
            f"rerun the same command to resume (exit status {EXIT_PREEMPTED})", file=sys.stderr)
      return EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  console.quiet_environment(is_verbose(sys.argv))  # before TensorFlow and XLA load
  app.run(main, flags_parser=_parse_flags)
