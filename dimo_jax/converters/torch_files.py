"""Reading PyTorch checkpoint files without executing code and finding the state dict inside them.

``load_torch_file`` reads with ``torch.load(weights_only=True)``. Files that also hold objects
of other classes (PyTorch Lightning's ``callbacks`` keyed by a Lightning class, hyper-parameter
containers, ...) are read, when the caller allows it, by a restricted unpickler of torch's zip
layout (``<archive>/data.pkl`` plus one ``<archive>/data/<key>`` record per storage): it builds
tensors, torch dtypes / sizes / devices, ``collections.OrderedDict`` and the builtin containers,
and replaces every other class or function the file names by an inert ``Placeholder`` class that
records the module and name; nothing named in the file is imported or called.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile
from typing import Any, Dict, List, Mapping, Tuple

from dimo_jax.storage.checkpoints import UserError

_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "module", "net", "network", "vit",
                 "ema", "model_ema", "ema_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


# ------------------------------------------------------------------------------------ placeholders


class Placeholder:
  """Stands in for an object (or, as the class itself, for a class or function) that a checkpoint
  names but the restricted reader does not build.

  Subclasses made by ``placeholder_class`` carry ``placeholder_module`` and ``placeholder_name``
  (where the file says the class lives). An instance keeps what the file would have passed:
  ``args`` / ``kwargs`` (constructor or call arguments), ``state`` (what ``__setstate__`` would get),
  ``items`` / ``list_items`` (entries of dict or list subclasses). No method of the original class
  ever runs.
  """
  placeholder_module = ""
  placeholder_name = ""

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.list_items = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):  # pylint: disable=unused-argument
    """Arguments are recorded by ``__new__``; nothing else happens."""

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list_items.append(value)

  def extend(self, values):
    self.list_items.extend(values)

  def __repr__(self):
    return f"<placeholder for a {self.placeholder_module}.{self.placeholder_name} object>"


def placeholder_class(module: str, name: str) -> type:
  """A new ``Placeholder`` subclass recording ``module.name``."""
  return type(str(name).split(".")[-1] or "Placeholder", (Placeholder,), {
      "placeholder_module": str(module), "placeholder_name": str(name), "__module__": __name__,
      "__doc__": f"Placeholder for {module}.{name} (never imported)."})


def is_placeholder(obj) -> bool:
  """True for a placeholder object or a placeholder class."""
  return isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder))


def placeholder_label(obj) -> str:
  """``module.name`` of a placeholder object or class."""
  return f"{obj.placeholder_module}.{obj.placeholder_name}"


def find_placeholders(obj, path: str = "", limit: int = 50) -> List[Tuple[str, str]]:
  """``(path, module.name)`` of the placeholders in ``obj`` (dict keys and values, lists, tuples,
  sets and the contents of placeholder objects), in order, at most ``limit``."""
  found: List[Tuple[str, str]] = []
  seen = set()

  def walk(value, where):
    if len(found) >= limit or id(value) in seen:
      return
    if is_placeholder(value):
      found.append((where or "<top>", placeholder_label(value)))
      if isinstance(value, type):
        return
    seen.add(id(value))
    if isinstance(value, Placeholder):
      walk(value.args, f"{where}.args")
      walk(value.state, f"{where}.state")
      walk(value.items, f"{where}.items")
      walk(value.list_items, f"{where}.list_items")
    elif isinstance(value, Mapping):
      for k, v in value.items():
        label = placeholder_label(k) if is_placeholder(k) else repr(k)
        walk(k, f"{where}[{label}] (key)")
        walk(v, f"{where}[{label}]")
    elif isinstance(value, (list, tuple, set, frozenset)):
      for i, v in enumerate(value):
        walk(v, f"{where}[{i}]")

  walk(obj, path)
  return found


# ------------------------------------------------------------------------------------ restricted reader

_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
             "bytes", "bytearray", "slice", "range")
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class _StorageType:
  """A torch storage class named in the file, reduced to its element dtype."""

  def __init__(self, name: str, dtype):
    self.name, self.dtype = name, dtype


class _Storage:
  """One storage record: a flat tensor of its element type."""

  def __init__(self, flat):
    self.flat = flat


_MAX_BUILT_ITEMS = 2**24


def _bounded(constructor):
  """``constructor`` (a builtin the file may call) refusing a size argument over
  ``_MAX_BUILT_ITEMS``: ``bytes(n)``, ``bytearray(n)`` and ``range(n)`` would otherwise let a
  tiny pickle ask for any allocation."""
  if constructor not in (bytes, bytearray, range):
    return constructor

  def build(*args):
    sizes = [a for a in args if isinstance(a, int)]
    span = len(range(*sizes)) if constructor is range and sizes else (sizes[0] if sizes else 0)
    if span > _MAX_BUILT_ITEMS:
      raise pickle.UnpicklingError(f"the pickle asks for {constructor.__name__}({span}); refused")
    return constructor(*args)

  return build


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
  import codecs  # pylint: disable=import-outside-toplevel
  return codecs.encode(obj, encoding, errors)


def _modern_name(module, name) -> Tuple[str, str]:
  """``(module, name)`` with Python 2 names (pickle protocol < 3 writes ``__builtin__``,
  ``copy_reg``, ...) mapped as pickle maps them."""
  module, name = str(module), str(name)
  if (module, name) in _compat_pickle.NAME_MAPPING:
    return _compat_pickle.NAME_MAPPING[(module, name)]
  return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler of torch's ``data.pkl`` that builds tensors and plain containers only.

  ``find_class`` returns a real object for the whitelisted names (tensor rebuild functions, torch
  storage types, dtypes, ``torch.Size`` / ``torch.device``, ``collections.OrderedDict``, builtin
  containers and scalars) and an inert ``Placeholder`` class for every other name, without
  importing its module. ``persistent_load`` reads the storage records from ``read_record``.
  """

  def __init__(self, file, read_record, torch_module):
    super().__init__(file)
    self._read_record = read_record
    self._torch = torch_module
    self._storages: Dict[str, _Storage] = {}
    self._placeholders: Dict[Tuple[str, str], type] = {}
    torch = torch_module
    self._allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("copyreg", "_reconstructor"): self._reconstructor,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name in _BUILTINS:
      self._allowed[("builtins", name)] = _bounded(getattr(builtins, name))
    for name, dtype in _STORAGE_DTYPES.items():
      self._allowed[("torch", name)] = _StorageType(name, getattr(torch, dtype))

  def find_class(self, module, name):
    key = _modern_name(module, name)
    if key in self._allowed:
      return self._allowed[key]
    if key[0] == "torch" and isinstance(getattr(self._torch, key[1], None), self._torch.dtype):
      return getattr(self._torch, key[1])
    if key not in self._placeholders:
      self._placeholders[key] = placeholder_class(*key)
    return self._placeholders[key]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r} (expected a torch storage)")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    if key not in self._storages:
      torch = self._torch
      data = self._read_record(f"data/{key}")
      size = torch.empty((), dtype=storage_type.dtype).element_size()
      if len(data) != int(numel) * size:
        raise pickle.UnpicklingError(f"storage data/{key}: {len(data)} bytes for {numel} elements of "
                                     f"{storage_type.dtype}")
      flat = (torch.frombuffer(bytearray(data), dtype=storage_type.dtype) if data
              else torch.empty((0,), dtype=storage_type.dtype))
      self._storages[key] = _Storage(flat)
    return self._storages[key]

  # Rebuilders: each takes what torch's function of the same name takes and returns a plain tensor.
  def _rebuild_tensor(self, storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f"a tensor refers to {storage!r}, not to a storage record")
    return self._torch.as_strided(storage.flat, tuple(size), tuple(stride), int(storage_offset))

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):  # pylint: disable=unused-argument
    return self._rebuild_tensor(storage, storage_offset, size, stride)

  def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks,
                         dtype, metadata=None):  # pylint: disable=unused-argument
    if not isinstance(storage, _Storage) or not isinstance(dtype, self._torch.dtype):
      raise pickle.UnpicklingError(f"unsupported tensor record ({storage!r}, {dtype!r})")
    return self._rebuild_tensor(_Storage(storage.flat.view(dtype)), storage_offset, size, stride)

  def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):  # pylint: disable=unused-argument
    return data

  def _rebuild_from_type_v2(self, func, new_type, args, state):  # pylint: disable=unused-argument
    return func(*args)

  def _reconstructor(self, cls, base, state):
    """``copyreg._reconstructor``: an instance of a placeholder class, else an inert record."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
      return cls() if state is None else cls(state)
    return placeholder_class("copyreg", "_reconstructor")(cls, base, state)


# ------------------------------------------------------------------------------------ declared sizes

_ELEMENT_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                  "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
_LEGACY_PICKLES = 4  # magic number, protocol version, system info, the object


class _BoundedReader:
  """A binary file seen as at most ``end`` bytes: ``read(n)`` never asks the file for more than
  what is left, so a length field in a hostile file cannot make a read allocate it."""

  def __init__(self, f, end: int):
    self._f, self._end = f, end

  def read(self, n: int = -1) -> bytes:
    left = max(0, self._end - self._f.tell())
    return self._f.read(left if n is None or n < 0 else min(n, left))

  def readline(self) -> bytes:
    return self._f.readline(max(0, self._end - self._f.tell()))

  def tell(self) -> int:
    return self._f.tell()


def _allocates(module: str, name: str) -> bool:
  """True for the constructors ``torch.load(weights_only=True)`` lets a file call with a size:
  ``bytearray(n)``, the legacy ``torch.*Tensor(n, ...)`` and ``torch.*Storage(n)``."""
  if module == "builtins":
    return name in ("bytearray", "bytes")
  return module.split(".")[0] == "torch" and name.endswith(("Tensor", "Storage"))


def _declared_count(args) -> int:
  """The element count integer arguments ask for (their product; a size tuple counts as its own)."""
  count = 1
  for a in args:
    if isinstance(a, (tuple, list)) and a and all(isinstance(x, int) for x in a):
      count *= _declared_count(a)
    elif isinstance(a, int) and not isinstance(a, bool):
      count *= max(a, 0)
  return count


class _SizeScanner(pickle.Unpickler):
  """Unpickles nothing: every class or function becomes an inert placeholder, each storage the
  pickle declares (its persistent id) is recorded as ``(key, element type name, numel)``, and a
  call of a constructor that allocates (``_allocates``) asking for more elements than ``limit``
  is refused."""

  def __init__(self, file, limit: int):
    super().__init__(file)
    self.storages: Dict[str, Tuple[str, int]] = {}
    self._classes: Dict[Tuple[str, str], Any] = {}
    self._limit = limit

  def find_class(self, module, name):
    key = _modern_name(module, name)
    module, name = key
    if key not in self._classes:
      inert = placeholder_class(*key)
      if _allocates(*key):
        def sized(*args, _label=f"{module}.{name}", _inert=inert, **kwargs):
          count = _declared_count(args)
          if count > self._limit:
            raise pickle.UnpicklingError(f"the pickle calls {_label} for {count} elements")
          return _inert(*args, **kwargs)
        sized.placeholder_name = name  # a storage type named in a persistent id
        self._classes[key] = sized
      else:
        self._classes[key] = inert
    return self._classes[key]

  def persistent_load(self, pid):
    if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
      storage_type, key, _, numel = pid[1:5]
      kind = getattr(storage_type, "placeholder_name", "") or getattr(storage_type, "name", "")
      if not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"a storage declares {numel!r} elements")
      self.storages[str(key)] = (str(kind), numel)
    return None


def _storage_bytes(kind: str, numel: int) -> int:
  dtype = _STORAGE_DTYPES.get(kind, kind)
  return numel * _ELEMENT_BYTES.get(dtype, 16)  # an unknown type: the widest element


def _scan_pickle(f, end: int, limit: int) -> Dict[str, Tuple[str, int]]:
  """The storages one pickle (from ``f``'s position, within ``end``) declares; every length field
  is checked against the bytes left first (``pickletools.genops``), so nothing large is allocated."""
  start = f.tell()
  for _ in pickletools.genops(_BoundedReader(f, end)):
    pass
  stop = f.tell()
  f.seek(start)
  scanner = _SizeScanner(io.BytesIO(f.read(stop - start)), limit)
  scanner.load()
  return scanner.storages


def check_declared_sizes(path: str) -> None:
  """Refuses a PyTorch file whose pickle asks for more bytes than the file holds, before torch
  allocates them: each storage of a zip checkpoint must match its record, the storages of a
  legacy file must fit in the file, no zip record may declare more bytes than the file, and no
  ``bytearray(n)`` / ``torch.*Tensor(n)`` / ``torch.*Storage(n)`` call may ask for more elements
  than the file has bytes.

  Raises ``UserError`` naming the file; a file that is not a torch pickle passes (torch reports it).
  """
  size = os.path.getsize(path)
  fix = "the file is corrupt or hostile; download it again from its release"
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        infos = {i.filename: i for i in archive.infolist()}
        for info in infos.values():
          if info.file_size > size:
            raise UserError(f"{path}: the record {info.filename} declares {info.file_size} bytes, more "
                            f"than the whole file ({size} bytes); {fix}")
        prefix = _archive_prefix(list(infos))
        with archive.open(f"{prefix}data.pkl") as f:
          data = io.BytesIO(f.read())
        for key, (kind, numel) in _scan_pickle(data, len(data.getvalue()), size).items():
          info = infos.get(f"{prefix}data/{key}")
          want = _storage_bytes(kind, numel)
          if info is not None and want > info.file_size:
            raise UserError(f"{path}: storage {key} declares {numel} elements ({want} bytes) but its record "
                            f"holds {info.file_size} bytes; {fix}")
      return
    with open(path, "rb") as f:
      declared = {}
      for _ in range(_LEGACY_PICKLES):
        declared.update(_scan_pickle(f, size, size))
  except UserError:
    raise
  except (pickle.UnpicklingError, ValueError, EOFError, TypeError, IndexError, KeyError, AttributeError,
          RecursionError, struct.error, zipfile.BadZipFile, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]}); "
                    f"{fix}") from None
  total = sum(_storage_bytes(kind, numel) for kind, numel in declared.values())
  if total > size:
    raise UserError(f"{path}: the pickle declares tensors of {total} bytes in a file of {size} bytes; {fix}")


def _archive_prefix(names: List[str]) -> str:
  pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError("not a torch zip archive (expected exactly one <archive>/data.pkl record)")
  return pickles[0][: -len("data.pkl")]


def load_restricted(path: str, torch_module=None) -> Any:
  """The object in a torch zip checkpoint, read by ``RestrictedUnpickler`` (see the module
  docstring): tensors and plain containers are built, anything else becomes a ``Placeholder``."""
  if torch_module is None:
    import torch as torch_module  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(os.fspath(path)) as archive:
    prefix = _archive_prefix(archive.namelist())
    names = set(archive.namelist())
    if f"{prefix}byteorder" in names:
      order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if order != "little":
        raise ValueError(f"{path}: storages are {order}-endian; only little-endian files are read")

    def read_record(name: str) -> bytes:
      if prefix + name not in names:
        raise pickle.UnpicklingError(f"record {prefix + name} is missing from the archive")
      return archive.read(prefix + name)

    with archive.open(f"{prefix}data.pkl") as f:
      return RestrictedUnpickler(f, read_record, torch_module).load()


# ------------------------------------------------------------------------------------ torch loading


def load_torch_file(path: str, placeholders: bool = False) -> Any:
  """A PyTorch checkpoint's content, read without executing code.

  ``torch.load(path, map_location='cpu', weights_only=True)`` first. When that refuses the file
  because it names other classes (a PyTorch Lightning checkpoint, say) and ``placeholders`` is
  True, a zip-format file is read again by ``load_restricted``: tensors and plain containers come
  back as such, every other object as an inert ``Placeholder``. With ``placeholders`` False such a
  file raises ``ValueError``.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Converting a PyTorch checkpoint needs torch (an optional extra): "
                      "pip install torch") from e
  check_declared_sizes(path)
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError / RuntimeError for objects other than tensors
    first = e
  if placeholders and zipfile.is_zipfile(path):
    try:
      return load_restricted(path, torch)
    except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError, KeyError, TypeError,
            zipfile.BadZipFile) as e:
      raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) "
                       f"({type(first).__name__}: {first}) nor by the restricted reader "
                       f"({type(e).__name__}: {e}).") from e
  raise ValueError(
      f"{path}: cannot be read with torch.load(weights_only=True) ({type(first).__name__}: {first}). "
      "If you trust the file, re-save its tensors only: "
      "torch.save(torch.load(path, weights_only=False)['model_state_dict'], 'state_dict.pth').") from first


def extract_state_dict(obj: Any, marker: str = "tok_emb.weight", source: str = "checkpoint") -> Dict[str, Any]:
  """Finds the state dict in a checkpoint object and strips ``module.`` / ``_orig_mod.`` prefixes.

  ``obj`` is a state dict (its keys include ``marker``) or a dict wrapping one under
  ``model_state_dict``, ``state_dict``, ``model``, ``ema``, ... (searched in that order).
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got "
                     f"{type(obj).__name__}.")

  def strip(key: str) -> str:
    changed = True
    while changed:
      changed = False
      for p in _PREFIXES:
        if key.startswith(p):
          key, changed = key[len(p):], True
    return key

  stripped: Dict[str, Any] = {}
  for k, v in obj.items():
    name = strip(str(k))
    if name in stripped:
      raise ValueError(f"{source}: key {k!r} collides with another key after removing the "
                       f"prefixes {list(_PREFIXES)}.")
    stripped[name] = v
  if marker in stripped:
    return stripped
  for key in _WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      try:
        return extract_state_dict(obj[key], marker, f"{source}[{key!r}]")
      except ValueError:
        continue
  keys = sorted(str(k) for k in obj)
  shown = ", ".join(keys[:40]) + (f", ... ({len(keys)} keys)" if len(keys) > 40 else "")
  raise ValueError(f"{source}: no state dict with {marker!r} found. Top-level keys: [{shown}]. "
                   f"Expected a state dict or a dict wrapping one under one of {list(_WRAPPER_KEYS)}.")
