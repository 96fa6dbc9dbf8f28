"""The package's import graph: no cycles, and every import points to the same or a lower layer."""
import ast
import os

import pytest

_PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dimo_jax")

# Bottom to top; a module may import modules of its own layer or below, never above.
LAYERS = (
    ("core", "console"),
    ("networks",),
    ("method",),
    ("storage", "data"),
    ("converters",),
    ("evaluation",),
    ("families",),
    ("modes",),
    ("main", "convert"),
)


def _modules(pkg_dir=_PKG):
  out = {}
  for folder, _, files in os.walk(pkg_dir):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(pkg_dir))[:-3].replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
  return out


def _imports(name, path, known):
  """Package modules that ``path`` imports anywhere (module level or inside functions)."""
  found = set()
  is_init = path.endswith("__init__.py")
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      cands = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = (name if is_init else name.rsplit(".", 1)[0]).split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      cands = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for c in cands:
      while c and c not in known:
        c = c.rsplit(".", 1)[0] if "." in c else ""
      if c and c != name and c != "dimo_jax":
        found.add(c)
  return found


def layer_of(module: str) -> int:
  part = module.split(".")[1] if "." in module else ""
  for i, names in enumerate(LAYERS):
    if part in names:
      return i
  raise AssertionError(f"module {module} belongs to no layer; add its package to LAYERS in {__file__}")


def _graph():
  mods = _modules()
  return {m: _imports(m, p, mods) for m, p in mods.items() if m != "dimo_jax"}


def find_cycles(graph):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def upward_imports(graph):
  return sorted((m, d) for m, deps in graph.items() for d in deps
                if not d.startswith(m + ".") and layer_of(d) > layer_of(m))


def test_no_import_cycle():
  assert find_cycles(_graph()) == []


def test_imports_point_down():
  assert upward_imports(_graph()) == []


def test_checks_catch_cycles_and_upward_imports():
  graph = {"dimo_jax.core.a": {"dimo_jax.core.b"}, "dimo_jax.core.b": {"dimo_jax.core.a"},
           "dimo_jax.modes.x": {"dimo_jax.core.a"}, "dimo_jax.networks.n": {"dimo_jax.modes.x"}}
  assert find_cycles(graph) == [["dimo_jax.core.a", "dimo_jax.core.b"]]
  assert upward_imports(graph) == [("dimo_jax.networks.n", "dimo_jax.modes.x")]
  with pytest.raises(AssertionError, match="no layer"):
    layer_of("dimo_jax.nowhere.m")


def test_core_imports_no_tensorflow_or_torch():
  for m, path in _modules().items():
    if m.startswith("dimo_jax.core"):
      text = open(path).read()
      assert "tensorflow" not in text and "import torch" not in text and "clu" not in text.split(), m


def test_console_loads_before_the_libraries_it_quiets():
  """``dimo_jax.console`` sets the environment TensorFlow and XLA read when they load: it imports no
  project module, nor JAX or TensorFlow."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  assert _graph()["dimo_jax.console"] == set()
  code = "import sys, dimo_jax.console; print(sorted(m for m in ('jax', 'tensorflow', 'absl') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(_PKG), capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_architecture_doc_names_every_module():
  """``docs/architecture.md``'s layer table names every module of the package in its layer's row."""
  import re  # pylint: disable=import-outside-toplevel
  doc = open(os.path.join(os.path.dirname(_PKG), "docs", "architecture.md"), encoding="utf-8").read()
  section = doc.split("## What each layer owns", 1)[1].split("\n## ", 1)[0]
  rows = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.split("|")[1:-1]]
    if len(cells) >= 2 and cells[0] not in ("layer", "---"):
      for layer in re.findall(r"`([a-z_]+)`", cells[0]) or [cells[0]]:
        rows[layer] = set(re.findall(r"`([a-z_0-9]+)`", cells[1]))
  missing = []
  for m in _modules():
    parts = m.split(".")
    if len(parts) == 2 and parts[1] in LAYERS_TOP:
      layer, leaf = "top", parts[1]
    elif len(parts) == 3:
      layer, leaf = parts[1], parts[2]
    else:
      continue
    if leaf not in rows.get(layer, ()):
      missing.append(m)
  assert not missing, f"docs/architecture.md: the layer table's rows do not name {sorted(missing)}"


LAYERS_TOP = ("main", "convert", "console")
