"""Command line: ``python -m dimo_jax.main --config=configs/<file>.py --workdir=<dir> [--config.key=value]``.

The mode is the config field ``mode`` (``--config.mode=teacher``); each mode is one module of
``dimo_jax.modes`` with a ``run(config, workdir)`` function: ``teacher`` trains a masked
diffusion model, ``distill`` runs Di[M]O, ``sample`` draws samples and ``evaluate`` scores them.
"""
from __future__ import annotations

import importlib
import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

MODES = {
    "teacher": "dimo_jax.modes.teacher",
    "sample": "dimo_jax.modes.sample",
    "distill": "dimo_jax.modes.distill",
    "evaluate": "dimo_jax.modes.evaluate",
}


def resolve_mode(mode: str):
  """The ``run`` function of ``mode``'s module; a clear error for an unknown mode."""
  if mode not in MODES:
    raise ValueError(f"unknown config.mode={mode!r}; choose one of {', '.join(MODES)} "
                     "(e.g. --config.mode=teacher)")
  return importlib.import_module(MODES[mode]).run


def run(config, workdir: str):
  """Runs ``config.mode`` with ``workdir``; returns what the mode returns."""
  if config is None:
    raise ValueError("no config given; pass --config=configs/<file>.py")
  if not workdir:
    raise ValueError("no workdir given; pass --workdir=<dir>")
  return resolve_mode(config.get("mode", "") if hasattr(config, "get") else "")(config, workdir)


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
