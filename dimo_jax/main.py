"""Command line: ``python -m dimo_jax.main --config=configs/<file>.py --workdir=<dir> [--config.key=value]``.

The mode is the config field ``mode`` (``--config.mode=teacher``): ``teacher`` trains a masked
diffusion model, ``sample`` draws samples from a trained one, ``distill`` runs Di[M]O and
``evaluate`` scores samples.
"""
from __future__ import annotations

import importlib
import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

# mode -> (module, function); each function is called as fn(config, workdir).
MODES = {
    "teacher": ("dimo_jax.train", "train_teacher"),
    "sample": ("dimo_jax.sample", "run_sample"),
    "distill": ("dimo_jax.train", "train_distill"),
    "evaluate": ("dimo_jax.evaluate", "run_evaluate"),
}

_MULTI_PROCESS_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def is_multi_process_env(environ=None) -> bool:
  """True when the environment describes several JAX processes: a coordinator address,
  ``JAX_NUM_PROCESSES`` > 1, or a multi-host TPU pod (``TPU_WORKER_HOSTNAMES``)."""
  env = os.environ if environ is None else environ
  if any(env.get(v) for v in _MULTI_PROCESS_VARS):
    return True
  try:
    if int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
      return True
  except ValueError:
    pass
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1


def maybe_initialize_distributed(config=None, environ=None) -> bool:
  """``jax.distributed.initialize()`` for multi-process runs (environment or ``config.distributed``)."""
  wanted = bool(config.get("distributed", False)) if config is not None and hasattr(config, "get") else False
  if not (wanted or is_multi_process_env(environ)):
    return False
  import jax  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize()
  logging.info("JAX distributed: process %d of %d.", jax.process_index(), jax.process_count())
  return True


def resolve_mode(mode: str):
  """The function that runs ``mode``; a clear error for unknown or not yet available modes."""
  if mode not in MODES:
    raise ValueError(f"unknown config.mode={mode!r}; choose one of {', '.join(MODES)} "
                     "(e.g. --config.mode=teacher)")
  module_name, fn_name = MODES[mode]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    module = None
  fn = getattr(module, fn_name, None) if module is not None else None
  if fn is None:
    raise NotImplementedError(f"config.mode={mode!r} needs {module_name}.{fn_name}, which this version of "
                              f"dimo_jax does not provide; available modes: {', '.join(available_modes())}")
  return fn


def available_modes():
  out = []
  for mode, (module_name, fn_name) in MODES.items():
    try:
      if getattr(importlib.import_module(module_name), fn_name, None) is not None:
        out.append(mode)
    except ImportError:
      pass
  return out


def run(config, workdir: str):
  """Runs ``config.mode`` with ``workdir``; returns what the mode returns."""
  if config is None:
    raise ValueError("no config given; pass --config=configs/<file>.py")
  if not workdir:
    raise ValueError("no workdir given; pass --workdir=<dir>")
  mode = config.get("mode", "") if hasattr(config, "get") else ""
  if mode not in MODES:
    resolve_mode(mode)  # raises the unknown-mode error before anything starts
  maybe_initialize_distributed(config)
  fn = resolve_mode(mode)
  return fn(config, workdir)


def define_flags(flag_values=flags.FLAGS, sys_argv=None):
  """Defines ``--config`` (with ``--config.key=value`` overrides) and ``--workdir``."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py).",
                                           flag_values=flag_values, lock_config=True, sys_argv=sys_argv)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.",
                                flag_values=flag_values)
  return config, workdir


_CONFIG, _WORKDIR = define_flags()


class _QuietLibraries(std_logging.Filter):
  """Drops the checkpoint library's routine INFO lines (warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in (record.pathname or "")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  std_logging.getLogger("absl").addFilter(_QuietLibraries())
  result = run(_CONFIG.value, _WORKDIR.value)
  if isinstance(result, dict):
    logging.info("Result: %s", {k: v for k, v in result.items() if not hasattr(v, "shape")})


if __name__ == "__main__":
  app.run(main)
