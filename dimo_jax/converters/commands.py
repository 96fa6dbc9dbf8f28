"""The convert commands a user runs for each released checkpoint, and the check that a config's
converted folders exist (naming the command when they do not).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from dimo_jax.storage import text_files

# ----------------------------------------------------------------------------- path checks

_DEFAULT_INPUTS = {
    "valeoai": "MaskGIT_ImageNet_256.pth",
    "dimo-generator": "pytorch_model.bin",
    "google-maskgit": "maskgit_imagenet256_checkpoint",
    "taming-vqgan": "VQGAN/last.ckpt",
    "google-vqgan": "tokenizer_imagenet256_checkpoint",
    "meissonic": "Meissonic/transformer",
    "meissonic-vq": "Meissonic/vqvae",
    "clip-text": "Meissonic/text_encoder",
}


def convert_command(kind: str, output: str, input_path: str = "", heads: Optional[int] = None) -> str:
  """The ``python -m dimo_jax.convert`` command line that writes ``output``."""
  cmd = (f"python -m dimo_jax.convert {kind} --input={input_path or _DEFAULT_INPUTS[kind]} "
         f"--output={output}")
  if heads and kind in ("valeoai", "dimo-generator"):
    cmd += f" --heads={heads}"
  return cmd


def _is_remote(path: str) -> bool:
  return "://" in path


def _is_checkpoint_dir(path: str) -> bool:
  """A local folder with ``config.json`` (in it, or beside it when it is a ``checkpoints``
  folder); object-store paths are left to the loaders."""
  if _is_remote(path):
    return True
  if os.path.basename(os.path.normpath(path)) == "checkpoints":
    path = os.path.dirname(os.path.normpath(path))
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _is_converted_config(config) -> bool:
  """A config whose teacher is a published checkpoint (it names the source file or a VQGAN)."""
  return bool(config.teacher.get("source", "")) or "vqgan" in config


def _teacher_problem(config, heads) -> Optional[str]:
  path = config.teacher.get("checkpoint", "")
  if path and _is_checkpoint_dir(path):
    return None
  what = "is not set" if not path else f"{path!r} does not exist or has no config.json"
  if not _is_converted_config(config):
    return (f"config.teacher.checkpoint {what}. Train a teacher first:\n  python -m dimo_jax.main "
            f"--config=<config> --workdir={path or '<dir>'} --config.mode=teacher\nor point "
            "--config.teacher.checkpoint at a teacher workdir.")
  kind = "google-maskgit" if config.model.get("arch", "preln") == "bert" else "valeoai"
  return (f"config.teacher.checkpoint {what}. Convert the published teacher first:\n  "
          + convert_command(kind, path or "pretrained/teacher", config.teacher.get("source", ""), heads)
          + "\nor point --config.teacher.checkpoint at a teacher workdir.")


def _vqgan_problem(config) -> Optional[str]:
  if "vqgan" not in config or not config.vqgan.get("checkpoint", ""):
    return None
  path = config.vqgan.checkpoint
  if _is_remote(path) or (os.path.isfile(os.path.join(path, "params.msgpack"))
                          and os.path.isfile(os.path.join(path, "vqgan.json"))):
    return None
  kind = f"{config.vqgan.get('kind', 'taming')}-vqgan"
  if kind not in _DEFAULT_INPUTS:
    raise ValueError(f"config.vqgan.kind={config.vqgan.get('kind')!r}; choose 'taming' or 'google'.")
  return (f"config.vqgan.checkpoint {path!r} does not exist or lacks params.msgpack / vqgan.json. "
          "Convert the VQGAN first:\n  " + convert_command(kind, path, config.vqgan.get("source", "")))


def check_paths(config, which: Sequence[str] = ("teacher", "vqgan")) -> None:
  """Raises ``FileNotFoundError`` naming each missing configured folder and the command that
  makes it (all of them in one message, so that a fresh checkout learns every convert command
  at once).

  ``which`` selects the sections: ``teacher`` (``config.teacher.checkpoint``: a converted
  checkpoint or teacher workdir with ``config.json``; a config without a published source
  is told to train one), ``vqgan`` (``config.vqgan.checkpoint``, skipped when empty or absent)
  and ``sample`` (``config.sample.checkpoint`` when set). Object-store paths are not checked.
  """
  heads = config.model.get("heads", None)
  problems = []
  if "teacher" in which:
    problems.append(_teacher_problem(config, heads))
  if "vqgan" in which:
    problems.append(_vqgan_problem(config))
  if all(problems) and len(problems) == 2 and _is_converted_config(config):
    # A fresh checkout of a published-teacher config: both convert commands, three lines.
    commands_ = [p.split("\n")[1].strip() for p in problems]
    raise FileNotFoundError(
        f"config.teacher.checkpoint {config.teacher.get('checkpoint', '')!r} and config.vqgan.checkpoint "
        f"{config.vqgan.checkpoint!r} are not converted yet; convert the published files first:\n  "
        + "\n  ".join(commands_))
  if "sample" in which and "sample" in config and config.sample.get("checkpoint", ""):
    path = config.sample.checkpoint
    if not _is_checkpoint_dir(path):
      problems.append(
          f"config.sample.checkpoint {path!r} does not exist or has no config.json. Use a distillation "
          "workdir, or convert the Di[M]O authors' generator:\n  "
          + convert_command("dimo-generator", path, "", heads))
  problems = [p for p in problems if p]
  if problems:
    raise FileNotFoundError("\n".join(problems))


# config.meissonic field -> (converter kind, released subfolder).
MEISSONIC_FOLDERS = {
    "transformer": ("meissonic", "transformer"),
    "vqvae": ("meissonic-vq", "vqvae"),
    "text_encoder": ("clip-text", "text_encoder"),
}


def _converted_kind(path: str) -> Optional[str]:
  """The ``kind`` of a converted folder (``params.msgpack`` + ``config.json``), else None."""
  if not (os.path.isfile(os.path.join(path, "params.msgpack"))
          and os.path.isfile(os.path.join(path, "config.json"))):
    return None
  try:
    meta = text_files.read_json(os.path.join(path, "config.json"))
  except (OSError, ValueError):  # unreadable: a folder of no known kind
    return ""
  return meta.get("kind", "") if isinstance(meta, dict) else ""


def check_meissonic_paths(config, which: Sequence[str] = ("transformer", "vqvae", "text_encoder",
                                                          "tokenizer")) -> None:
  """Raises ``FileNotFoundError`` naming every missing or wrong Meissonic folder of
  ``config.meissonic`` and the command that writes each (one message for all of them).

  ``transformer``, ``vqvae`` and ``text_encoder`` are converted folders (``params.msgpack`` +
  ``config.json`` of the right kind, written by ``python -m dimo_jax.convert``); ``tokenizer`` is
  the released ``tokenizer/`` folder itself (no conversion). The commands read the released
  folders under ``config.meissonic.source``.
  """
  if "meissonic" not in config:
    raise ValueError("the config has no meissonic section; use --config=configs/meissonic.py")
  mc = config.meissonic
  source = mc.get("source", "") or "Meissonic"
  problems = []
  for field in which:
    path = mc.get(field, "")
    flag = f"config.meissonic.{field}"
    if field == "tokenizer":
      if not path or not os.path.isdir(path):
        problems.append(f"{flag} {path!r} is not a folder. Point --{flag} at the tokenizer/ folder "
                        f"of the Meissonic release (vocab.json + merges.txt), e.g. {source}/tokenizer")
      continue
    kind, sub = MEISSONIC_FOLDERS[field]
    command = convert_command(kind, path or f"pretrained/meissonic/{sub}", f"{source}/{sub}")
    if not path:
      problems.append(f"{flag} is not set. Convert the released {sub}/ folder:\n    {command}")
      continue
    found = _converted_kind(path)
    if found is None:
      what = "does not exist" if not os.path.exists(path) else "has no params.msgpack + config.json"
      problems.append(f"{flag} {path!r} {what} (a released {sub}/ folder must be converted "
                      f"first):\n    {command}")
    elif found != kind:
      problems.append(f"{flag} {path!r} holds a converted {found or 'unknown'} model, not "
                      f"{kind}; point it at the folder written by:\n    {command}")
  if problems:
    raise FileNotFoundError("Meissonic folders missing or wrong:\n  " + "\n  ".join(problems))
