"""Text and JSON files the user brings, read one way everywhere: UTF-8, a leading byte-order mark
dropped, and a decoding or JSON error turned into one line naming the file, where it failed and
the fix."""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, List

from dimo_jax.storage.checkpoints import UserError


def read_text(path, fix: str = "") -> str:
  """The text of ``path`` decoded as UTF-8, without a leading byte-order mark.

  Raises ``FileNotFoundError`` / ``IsADirectoryError`` as ``open`` does, and ``UserError`` for
  bytes that are not UTF-8 (the offset and the byte, then ``fix``).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  if raw.startswith(codecs.BOM_UTF8):
    raw = raw[len(codecs.BOM_UTF8):]
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise UserError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                    f"{e.start}); save the file as UTF-8{'; ' + fix if fix else ''}") from None


def read_lines(path, fix: str = "") -> List[str]:
  """The lines of ``read_text(path)`` split at ``\n`` only (as iterating over the open file does),
  without their ``\n`` / ``\r\n`` endings."""
  lines = read_text(path, fix).split("\n")
  if lines and not lines[-1]:
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_json(path, fix: str = "") -> Any:
  """The JSON value of ``path`` (read by ``read_text``); ``UserError`` naming the line and column
  of a syntax error, then ``fix``."""
  text = read_text(path, fix)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{os.fspath(path)}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
                    f"{'; ' + fix if fix else ''}") from None
  except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, too deep a nesting
    raise UserError(f"{os.fspath(path)}: cannot be read as JSON ({type(e).__name__}: "
                    f"{str(e)[:120]}){'; ' + fix if fix else ''}") from None
