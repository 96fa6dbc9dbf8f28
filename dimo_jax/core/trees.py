"""Nested parameter dicts <-> flat key paths (``"a/b/c"`` strings or ``("a", "b", "c")`` tuples)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = "/") -> Dict[str, Any]:
  """Nested mapping -> ``{"a/b/c": leaf}``."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{sep}{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, name, sep))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
  """``{"a/b/c": leaf}`` -> nested dicts."""
  return unflatten_paths({tuple(k.split(sep)): v for k, v in flat.items()})


def flatten_paths(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  """Nested mapping -> ``{("a", "b", "c"): leaf}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_paths(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def unflatten_paths(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  """``{("a", "b", "c"): leaf}`` -> nested dicts."""
  out: Dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out
