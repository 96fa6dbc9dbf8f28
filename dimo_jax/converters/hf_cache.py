"""Hugging Face model ids as converter inputs, resolved in the local Hugging Face cache.

``python -m dimo_jax.convert <kind> --input=<id>`` accepts, besides a local file or folder,

- ``<org>/<name>`` with ``--subfolder=<path in the repository>`` and ``--revision=<branch, tag or
  commit>`` (default ``main``), or
- ``<org>/<name>@<revision>:<path in the repository>`` in one argument (both parts optional),

e.g. ``--input=MeissonFlow/Meissonic:transformer``. The id is looked up in the cache that
``huggingface_hub`` fills (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``: ``models--<org>--<name>/refs/<revision>`` names the commit,
``snapshots/<commit>/...`` holds the files) without any network access. Only
``--allow_download`` lets ``huggingface_hub`` fetch what is missing. A local path that exists
always wins over an id of the same spelling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

# <org>/<name>, then optionally @<revision> and :<path inside the repository>.
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[\w])(?:@(?P<revision>[^:@\s]+))?(?::(?P<sub>\S*))?$")


@dataclass(frozen=True)
class HubInput:
  """A model id: ``repo`` (``org/name``), ``revision`` (None: ``main``), ``subfolder`` (a folder or
  file inside the repository, '' for its root)."""
  repo: str
  revision: Optional[str] = None
  subfolder: str = ""

  def spelled(self) -> str:
    return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.subfolder}" if self.subfolder else "")


def parse_id(text: str, subfolder: str = "", revision: str = "") -> Optional[HubInput]:
  """The ``HubInput`` that ``text`` spells (``--subfolder`` / ``--revision`` fill what it leaves
  out), or None when ``text`` is not a model id (an absolute or ``./`` path, a file name, more than
  one ``/`` before ``@`` or ``:``). Raises ``ValueError`` when the id and the flags disagree."""
  if not text or text.startswith((".", "/", "~")) or "\\" in text:
    return None
  m = _ID.match(text)
  if m is None:
    return None
  sub_in_id, rev_in_id = (m.group("sub") or "").strip("/"), m.group("revision") or ""
  subfolder, revision = subfolder.strip("/"), revision or ""
  if sub_in_id and subfolder and sub_in_id != subfolder:
    raise ValueError(f"--input={text} names the subfolder {sub_in_id!r} but --subfolder={subfolder!r}; "
                     "give it once")
  if rev_in_id and revision and rev_in_id != revision:
    raise ValueError(f"--input={text} names the revision {rev_in_id!r} but --revision={revision!r}; give it once")
  sub = sub_in_id or subfolder
  if ".." in sub.split("/"):
    raise ValueError(f"--input={text}: the path inside the repository may not contain '..' ({sub!r})")
  return HubInput(m.group("repo"), rev_in_id or revision or None, sub)


def cache_dir() -> str:
  """The Hugging Face hub cache looked in: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub`` (read when called, so a changed environment counts)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
  return os.path.join(os.path.expanduser(home), "hub")


def download_command(hub: HubInput) -> str:
  """The command line that puts ``hub`` into the cache."""
  cmd = f"hf download {hub.repo}"
  if hub.revision:
    cmd += f" --revision {hub.revision}"
  if hub.subfolder:
    cmd += f" --include '{hub.subfolder}/*' '{hub.subfolder}'"
  return cmd


def _not_cached(path: str, hub: HubInput, cache: str, what: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"--input={path} is no local file or folder, and the model {hub.spelled()} {what} in the Hugging Face "
      f"cache {cache}; download it with "
      f"`{download_command(hub)}` (`huggingface-cli download` before huggingface_hub 1.0), "
      "or pass --allow_download")


def resolve_input(path: str, subfolder: str = "", revision: str = "", allow_download: bool = False) -> str:
  """The local file or folder that ``--input=path`` (with ``--subfolder`` / ``--revision``) names.

  A path that exists is returned as it is (joined with ``subfolder`` when given); a model id is
  resolved in the Hugging Face cache without network access (downloading only with
  ``allow_download``); anything else is returned unchanged for the converter to report. Raises
  ``FileNotFoundError`` naming the cache looked in and the download command when the id, its
  revision or its subfolder is not cached, ``ValueError`` for conflicting flags."""
  if os.path.exists(path):
    if revision:
      raise ValueError(f"--revision={revision} applies to Hugging Face model ids; --input={path} is a local path")
    return os.path.join(path, subfolder) if subfolder else path
  hub = parse_id(path, subfolder, revision)
  if hub is None:
    if subfolder or revision:
      raise FileNotFoundError(f"--input={path} is neither a local path nor a Hugging Face model id "
                              "(<org>/<name>); --subfolder and --revision apply to model ids")
    return path
  # pylint: disable=import-outside-toplevel
  import huggingface_hub
  from huggingface_hub import errors
  cache = cache_dir()
  patterns = [hub.subfolder, f"{hub.subfolder}/*"] if hub.subfolder else None
  try:
    root = huggingface_hub.snapshot_download(hub.repo, revision=hub.revision, cache_dir=cache,
                                             allow_patterns=patterns, local_files_only=not allow_download)
  except errors.OfflineModeIsEnabled:
    raise _not_cached(path, hub, cache, "is not (fully) available offline (HF_HUB_OFFLINE is set)") from None
  except errors.LocalEntryNotFoundError:
    raise _not_cached(path, hub, cache, "is not") from None
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
    raise FileNotFoundError(f"{hub.spelled()}: the Hugging Face Hub has no such "
                            f"{'revision' if isinstance(e, errors.RevisionNotFoundError) else 'repository'} "
                            "(check the id, or log in with `hf auth login` for a gated one)") from None
  resolved = os.path.join(root, hub.subfolder) if hub.subfolder else root
  if not os.path.exists(resolved):
    raise _not_cached(path, hub, cache, f"has no {hub.subfolder!r} in its cached snapshot {os.path.basename(root)}")
  return resolved
