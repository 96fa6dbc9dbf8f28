"""What the modes need from a model family, and the registry that names the families.

A family is one kind of token network and its data: ``classes`` (class-conditional token
grids and sequences: the embedded digits, token tables, MaskGIT), ``captioned_digits`` (the
embedded text-to-image task) and ``meissonic`` (converted Meissonic text-to-image). The modes
(``modes/teacher.py``, ``modes/distill.py``, ``modes/sample.py``, ``modes/evaluate.py``) are
written once against ``Family``; ``get_family(config)`` picks the family from the explicit key
``config.family``.

Every network a family hands out follows the token networks' convention: ``model.apply({"params":
p}, tokens [B, L], cond)`` gives logits ``[B, L, codebook_size]``, with ``codebook_size``,
``seq_len``, ``num_classes``, ``has_null_class``, ``dropout`` and ``mask_id`` (default
``codebook_size``) as attributes. Nothing here assumes images or labels: a family whose tokens are
not pictures decodes to None, and a family without conditions has a ``ConditionSource`` whose
``spec`` is None and whose ``negative`` is None.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from dimo_jax.storage.checkpoints import UserError

# config.family -> module of dimo_jax.families defining FAMILY
FAMILIES = {
    "classes": "dimo_jax.families.classes",
    "captioned_digits": "dimo_jax.families.captioned_digits",
    "meissonic": "dimo_jax.families.meissonic",
    "text": "dimo_jax.families.text",
}

GENERATOR_SCHEMA = 1  # version of the generator folder's config.json layout (``generator_config``)


@dataclasses.dataclass
class Loaded:
  """A network with its parameters, in the token networks' convention (module docstring).
  ``stored``: the ``config.json`` of the folder it came from (what a generator's folder repeats)."""
  model: Any
  params: Any
  stored: dict
  extras: Dict[str, Any] = dataclasses.field(default_factory=dict)  # what the family keeps beside (e.g. a text tower)


class ConditionSource:
  """The conditions the networks see, per example.

  ``spec``: a pytree of ``jax.ShapeDtypeStruct`` of ONE example's condition, or None when the
  Di[M]O step draws its conditions itself from the step's key (class labels, uniform over the
  classes; the negative condition is then the null class, which the step uses for guidance).
  ``step_conditions(seed, step, batch, aux_updates)`` gives ``{"gen": [B, ...], "aux": [A, B,
  ...], "neg": [1, ...]}`` as host arrays, a pure function of ``(seed, step)`` so that a resumed
  run sees the conditions an uninterrupted one saw (None when ``spec`` is None);
  ``negative()`` is the negative condition (guidance's "unconditional" side) with a leading axis
  of 1, or None where the family has none."""

  spec: Any = None

  def step_conditions(self, seed: int, step: int, batch: int, aux_updates: int) -> Optional[Dict[str, Any]]:
    return None

  def negative(self) -> Any:
    return None


class ClassLabels(ConditionSource):
  """Class labels: drawn inside the Di[M]O step; the negative condition is the null class
  (label ``num_classes``)."""

  def __init__(self, num_classes: int):
    self.num_classes = int(num_classes)

  def negative(self):
    return np.full((1,), self.num_classes, np.int32)


@dataclasses.dataclass
class TeacherRun:
  """What ``mode=teacher``'s loop (``modes.loop.teacher_loop``) needs from a family, built once
  the workdir is locked.

  ``fns``: the objective's compiled ``init`` / ``step`` and ``batch_sharding`` (``method.mdm`` or
  ``method.mdm_text``); ``batches(start)``: an iterator of the step's data arguments after
  ``state`` (placed for the step), a pure function of ``(seed, step)`` so a resumed run continues
  the stream; ``run_config``: written to ``<workdir>/config.json`` and compared on resume;
  ``validate(state)``: the validation metrics (``val_loss`` first) or None; ``samples(state,
  step, path)``: writes a grid of the EMA parameters' samples (or None); ``finish(state, step,
  final)``: what the family writes when the run reaches its last step (returns more metrics);
  ``finished()``: whether the workdir already holds the finished teacher."""
  model: Any
  fns: Any
  run_config: dict
  batches: Callable[[int], Iterator[tuple]]
  num_params: int = 0
  describe: str = ""
  validate: Optional[Callable[[Any], dict]] = None
  samples: Optional[Callable[[Any, int, str], None]] = None
  finish: Optional[Callable[[Any, int, dict], dict]] = None
  finished: Callable[[], bool] = lambda: False


class Family:
  """The interface of a model family (subclasses override what they support)."""

  name = ""
  # config.model fields a command-line flag may set in the modes that rebuild their networks from
  # a stored config.json (distill, sample, evaluate); every other --config.model.<field> is refused.
  compute_fields: Tuple[str, ...] = ()
  # the default evaluators of mode=evaluate, by name (modes/evaluate.py wires them)
  evaluators: Tuple[str, ...] = ()

  # -------------------------------------------------------------- mode=teacher
  def teacher_run(self, config, workdir: str, mesh) -> TeacherRun:
    """The teacher network, its data and its objective step for ``mode=teacher``."""
    raise UserError(f"config.family={self.name!r} trains no teacher (mode=teacher); convert a released "
                    "one with `python -m dimo_jax.convert` and distil it with --config.mode=distill")

  # -------------------------------------------------------------- networks
  def load_teacher(self, config, workdir: str) -> Loaded:
    """The teacher named by ``config`` (``config.teacher.checkpoint``, or the family's own
    place), in the token networks' convention; a missing folder names the command that makes it."""
    raise NotImplementedError

  def load_generator(self, config, path: str) -> Loaded:
    """A one-step generator from ``path`` (a distillation workdir or its ``generator`` folder)."""
    raise NotImplementedError

  def prepare_distill(self, config, workdir: str) -> None:
    """Checks a distillation makes before any network loads (e.g. reading a prompt file)."""

  def sized_teacher_config(self, config):
    """``config`` for ``mode=teacher`` with what the family sizes from its data filled in (model
    sizes and step count left at 0, within ``config.train.budget``); unchanged by default."""
    return config

  def teacher_to_train(self, config, workdir: str) -> Optional[str]:
    """The folder where ``mode=distill`` first trains the teacher it distils (``mode=teacher``'s
    loop on the same config), or None when the teacher is given."""
    return None

  def condition_source(self, config, teacher: Loaded) -> ConditionSource:
    """The conditions of a Di[M]O run of ``teacher``."""
    return ConditionSource()

  def mesh_axes(self, config) -> Tuple[int, int]:
    """``(data, fsdp)`` sizes of the device mesh (-1: every device left)."""
    mc = config.get("mesh", {})
    return int(mc.get("data", -1)), int(mc.get("fsdp", 1))

  def compute_overrides(self, config) -> dict:
    """The compute fields set in ``config.model``, applied to a stored network."""
    model = config.get("model", None) or {}
    return {k: model.get(k) for k in self.compute_fields if model.get(k) not in (None, "")}

  # -------------------------------------------------------------- what a person looks at
  def decode(self, tokens: np.ndarray, stored: dict) -> Optional[np.ndarray]:
    """Tokens ``[N, L]`` -> what a person looks at (images ``[N, H, W, C]`` in [0, 1]), or None
    where the tokens are not pictures."""
    return None

  def sample_grid(self, loaded: Loaded, key, path: str, config) -> Optional[str]:
    """Writes a PNG grid of ``loaded``'s one-step samples to ``path`` (every process calls it;
    process 0 writes); returns the path, or None where the family draws no grids."""
    return None

  def teacher_grid(self, loaded: Loaded, key, path: str, config) -> Optional[str]:
    """Writes a PNG grid of the teacher's multi-step samples (as ``sample_grid``)."""
    return None

  def evaluate_table(self, config, workdir: str, teacher: Loaded, generator_params) -> Optional[str]:
    """The family's own table at the end of a distillation (``config.distill.evaluate_at_end``),
    or None to leave it to ``mode=evaluate``."""
    return None

  # -------------------------------------------------------------- what a run writes
  def run_config(self, config, teacher: Loaded) -> dict:
    """The distillation's ``config.json`` (compared on resume): the config and the teacher's
    network and data description."""
    return dict(config_dict(config), family=self.name)

  def network_config(self, teacher: Loaded, model) -> dict:
    """The family's description of the generator network (the keys its loader reads)."""
    return {}

  def generator_config(self, run_config: dict, teacher: Loaded, model, step: int) -> dict:
    """The generator folder's ``config.json``, one schema for every family: the run's config,
    ``family``, ``role: generator``, ``schema``, ``step`` and the family's ``network_config``
    entries at the top level (the keys its loader reads back)."""
    return dict(run_config, **self.network_config(teacher, model), family=self.name, role="generator",
                schema=GENERATOR_SCHEMA, step=int(step))


def config_dict(config) -> dict:
  """A ConfigDict (or dict) as a plain dict."""
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def family_name(config) -> str:
  """``config.family``; a config without it is a ``UserError`` naming the flag."""
  name = config.get("family", "") if hasattr(config, "get") else ""
  if not name:
    raise UserError(f"the config has no 'family'; add --config.family=<{'|'.join(FAMILIES)}> (or "
                    "c.family in the config file)")
  return str(name)


def get_family(config) -> Family:
  """The ``Family`` that ``config.family`` names; an unknown name is a ``UserError`` listing
  the known ones."""
  name = family_name(config)
  if name not in FAMILIES:
    raise UserError(f"unknown config.family={name!r}; choose one of {', '.join(FAMILIES)} "
                    f"(--config.family={next(iter(FAMILIES))})")
  return importlib.import_module(FAMILIES[name]).FAMILY
