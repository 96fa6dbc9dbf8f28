"""The convert commands a user runs for each released checkpoint, and the check that a config's
converted folders exist (naming the command when they do not).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

# ----------------------------------------------------------------------------- path checks

_DEFAULT_INPUTS = {
    "valeoai": "MaskGIT_ImageNet_256.pth",
    "dimo-generator": "pytorch_model.bin",
    "google-maskgit": "maskgit_imagenet256_checkpoint",
    "taming-vqgan": "VQGAN/last.ckpt",
    "google-vqgan": "tokenizer_imagenet256_checkpoint",
}


def convert_command(kind: str, output: str, input_path: str = "", heads: Optional[int] = None) -> str:
  """The ``python -m dimo_jax.convert`` command line that writes ``output``."""
  cmd = (f"python -m dimo_jax.convert {kind} --input={input_path or _DEFAULT_INPUTS[kind]} "
         f"--output={output}")
  if heads and kind in ("valeoai", "dimo-generator"):
    cmd += f" --heads={heads}"
  return cmd


def _is_checkpoint_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def check_paths(config, which: Sequence[str] = ("teacher", "vqgan")) -> None:
  """Raises ``FileNotFoundError`` naming a missing configured file and the command that makes it.

  ``which`` selects the sections: ``teacher`` (``config.teacher.checkpoint``: a converted
  checkpoint or teacher workdir with ``config.json``), ``vqgan`` (``config.vqgan.checkpoint``,
  skipped when empty or absent) and ``sample`` (``config.sample.checkpoint`` when set).
  """
  arch = config.model.get("arch", "preln")
  heads = config.model.get("heads", None)
  if "teacher" in which:
    path = config.teacher.get("checkpoint", "")
    if not path or not _is_checkpoint_dir(path):
      kind = "google-maskgit" if arch == "bert" else "valeoai"
      what = "is not set" if not path else f"{path!r} does not exist or has no config.json"
      raise FileNotFoundError(
          f"config.teacher.checkpoint {what}. Convert the published teacher first:\n  "
          + convert_command(kind, path or "pretrained/teacher", config.teacher.get("source", ""), heads)
          + "\nor point --config.teacher.checkpoint at a teacher workdir.")
  if "vqgan" in which and "vqgan" in config and config.vqgan.get("checkpoint", ""):
    path = config.vqgan.checkpoint
    if not (os.path.isfile(os.path.join(path, "params.msgpack"))
            and os.path.isfile(os.path.join(path, "vqgan.json"))):
      kind = f"{config.vqgan.get('kind', 'taming')}-vqgan"
      if kind not in _DEFAULT_INPUTS:
        raise ValueError(f"config.vqgan.kind={config.vqgan.get('kind')!r}; choose 'taming' or 'google'.")
      raise FileNotFoundError(
          f"config.vqgan.checkpoint {path!r} does not exist or lacks params.msgpack / vqgan.json. "
          "Convert the VQGAN first:\n  " + convert_command(kind, path, config.vqgan.get("source", "")))
  if "sample" in which and "sample" in config and config.sample.get("checkpoint", ""):
    path = config.sample.checkpoint
    if not _is_checkpoint_dir(path):
      raise FileNotFoundError(
          f"config.sample.checkpoint {path!r} does not exist or has no config.json. Use a distillation "
          "workdir, or convert the Di[M]O authors' generator:\n  "
          + convert_command("dimo-generator", path, "", heads))
