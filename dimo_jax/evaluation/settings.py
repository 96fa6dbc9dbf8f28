"""The options of one evaluation (``config.evaluate``) and of the samplers (``config.sample``),
read and checked."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

from absl import logging

from dimo_jax.core import generator_steps as gen_steps
from dimo_jax.core import masking, samplers
from dimo_jax.evaluation.fid_protocol import check_protocol


# ---------------------------------------------------------------------------- sampler settings
DEFAULT_STEPS = 16  # the teacher's step count wherever config.sample.steps is not set


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The sampler options of ``config.sample`` every family shares (``sampler_settings_from_config``).

  ``temperature`` and ``guidance`` are None where the config leaves them unset: each family's
  sampler has its own default (a number for the class-conditional samplers, Meissonic's Gumbel
  ramp ``(2, 0)`` and guidance 9); ``batch_size`` 0 is unset too (a family's default)."""
  sampler: str = "confidence"
  steps: int = DEFAULT_STEPS
  schedule: str = "arccos"
  temperature: Any = None
  r_temp: float = 4.5
  guidance: Optional[float] = None
  guidance_schedule: str = "constant"
  top_k: int = 0
  top_p: float = 1.0
  r_init: Any = 0.6
  sigma: float = 0.1
  seed: int = 0
  batch_size: int = 0
  generator_steps: int = 0  # 0: the step count the generator was trained for (its folder's config.json)

  def teacher_kwargs(self) -> dict:
    """The class-conditional samplers' keyword arguments (``core.samplers.confidence_sampler``)."""
    return dict(steps=self.steps, schedule=self.schedule,
                temperature=float(1.0 if self.temperature is None else self.temperature),
                guidance=float(1.0 if self.guidance is None else self.guidance),
                guidance_schedule=self.guidance_schedule, top_k=self.top_k, top_p=self.top_p)


def sampler_settings_from_config(config, **overrides) -> SamplerSettings:
  """``config.sample``'s sampler options (a ConfigDict or dict, or a config holding one under
  ``sample``; ``overrides`` replace fields), checked: a bad value is a ``ValueError`` naming the
  flag. The one reader of these fields for every mode and family."""
  sc = config.get("sample", None) if hasattr(config, "get") and "sample" in config else config
  get = (lambda k, d: sc.get(k, d)) if sc is not None else (lambda k, d: d)
  guidance, temperature = get("guidance", None), get("temperature", None)
  values = dict(sampler=str(get("sampler", "confidence")), steps=int(get("steps", DEFAULT_STEPS)),
                schedule=str(get("schedule", "arccos")), temperature=temperature, r_temp=float(get("r_temp", 4.5)),
                guidance=None if guidance is None else float(guidance),
                guidance_schedule=str(get("guidance_schedule", "constant")), top_k=int(get("top_k", 0)),
                top_p=float(get("top_p", 1.0)), r_init=get("r_init", 0.6), sigma=float(get("sigma", 0.1)),
                seed=int(get("seed", 0)), batch_size=int(get("batch_size", 0)),
                generator_steps=int(get("generator_steps", 0)))
  values.update(overrides)
  if values["steps"] < 1:
    raise ValueError(f"config.sample.steps must be >= 1, got {values['steps']}")
  if values["generator_steps"] < 0:
    raise ValueError(f"config.sample.generator_steps must be >= 0 (0: the step count the generator was trained "
                     f"for), got {values['generator_steps']}")
  if get("batch_size", None) is not None and values["batch_size"] < 1:
    raise ValueError(f"config.sample.batch_size must be >= 1, got {values['batch_size']}")
  return SamplerSettings(**values)


# ---------------------------------------------------------------------------- generator steps
@dataclasses.dataclass(frozen=True)
class GeneratorPlan:
  """How a generator is sampled: ``steps`` (what was asked, or what it was trained for), the
  ``trained`` step count and ``schedule`` of its re-masking levels, both from its folder."""
  steps: int
  trained: int
  schedule: Any

  def step_counts(self) -> Tuple[int, ...]:
    """1 .. ``steps``: the generator rows of a table."""
    return tuple(range(1, self.steps + 1))

  def schedule_at(self, steps: int):
    """The re-masking levels at ``steps`` steps: a schedule name as it is; a tuple of ratios cut to
    its first ``steps - 1`` levels (more steps than trained were refused by ``generator_plan``)."""
    if isinstance(self.schedule, str):
      return self.schedule
    return tuple(self.schedule[:steps - 1])


def trained_generator(stored: Optional[dict]) -> Tuple[int, Any]:
  """``(generator_steps, generator_schedule)`` a generator was trained for, read from its folder's
  ``config.json`` (the ``distill`` section the run recorded); ``(1, 'linear')`` where the folder
  does not say (a converted generator, or one distilled before the k-step generator)."""
  distill = (stored or {}).get("distill") or {}
  steps = distill.get("generator_steps", 1)
  schedule = distill.get("generator_schedule", "linear")
  schedule = schedule if isinstance(schedule, str) else tuple(float(r) for r in schedule)
  try:
    gen_steps.check_schedule(schedule, steps, "distill.")
  except ValueError as e:
    raise ValueError(f"the generator's config.json records {e}; rewrite its distill section or redistil") from None
  return int(steps), schedule


def generator_plan(stored: Optional[dict], requested: int = 0, source: str = "the generator") -> GeneratorPlan:
  """The step count to sample a generator at: ``requested`` (``config.sample.generator_steps``; 0:
  what it was trained for) with the trained count and schedule of ``stored`` (``trained_generator``).
  A count above the trained one is allowed and logged as a warning: such a generator never saw its
  own outputs re-masked that often (``docs/proofs.md``, section 10)."""
  trained, schedule = trained_generator(stored)
  steps = int(requested) or trained
  if steps < 1:
    raise ValueError(f"config.sample.generator_steps must be >= 0 (0: the trained {trained}), got {requested}")
  if steps > trained and not isinstance(schedule, str):
    raise ValueError(f"config.sample.generator_steps={steps}: {source} was trained for {trained} steps with the "
                     f"re-masking levels {schedule}, which name no level for step {trained + 1}; ask for at most "
                     f"{trained}")
  if steps > trained:
    logging.warning("config.sample.generator_steps=%d is above the %d step(s) %s was trained for "
                    "(distill.generator_steps): its samples are likely worse than at %d", steps, trained, source,
                    trained)
  return GeneratorPlan(steps, trained, schedule)


# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """The options of one evaluation (``config.evaluate``; see ``settings_from_config``)."""
  teacher_checkpoint: str = ""
  generator: str = ""
  teacher_steps: Tuple[int, ...] = (1, 2, 4, 8, 16)
  teacher_samplers: Tuple[str, ...] = ()  # () : config.sample.sampler only; several: rows for each
  generator_temperatures: Tuple[float, ...] = (1.0,)
  r_init: Any = 0.6
  sigma: float = 0.1
  per_class: int = 50
  num_samples: int = 0
  batch_size: int = 100
  seed: int = 0
  use_ema: bool = True
  reference_split: str = "val"
  real_rows: bool = True
  inception_path: str = ""
  fid_protocol: str = "project"  # 'paper': the paper's Table-1 protocol (evaluation/fid_protocol.py)
  reference_stats: str = ""
  reference_images: str = ""
  reference_image_size: int = 256
  classifier_dir: str = ""
  classifier: Any = None
  prdc_k: int = 3
  is_splits: int = 10
  entropy_samples: int = 256
  entropy_threshold: float = 1e-3
  timing_repeats: int = 3
  grid_steps: Tuple[int, ...] = (1, 4, 16)
  grid_columns: int = 10
  output_dir: str = ""
  evaluators: Any = ()  # evaluation.evaluators' names ('' or (): the family's defaults)


REFERENCE_SPLITS = ("val", "train", "all")


def as_tuple(value, cast, name):
  if value is None:
    return ()
  if isinstance(value, str):
    value = [v for v in value.replace(",", " ").split() if v]
  if isinstance(value, (int, float)):
    value = [value]
  try:
    return tuple(cast(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.evaluate.{name}={value!r} must be a list of numbers, e.g. [1, 2, 4]") from e


def settings_from_config(config) -> EvalSettings:
  """Reads ``config.evaluate`` (a ConfigDict or dict; missing fields take their defaults, some
  from ``config.sample`` and ``config.teacher``). Unknown fields raise ValueError."""
  ev = config.get("evaluate", None) if hasattr(config, "get") else None
  ev = dict(ev.items()) if ev is not None and hasattr(ev, "items") else {}
  names = {f.name for f in dataclasses.fields(EvalSettings)}
  unknown = sorted(set(ev) - names)
  if unknown:
    raise ValueError(f"config.evaluate has unknown field(s) {unknown}; known fields: {sorted(names)}")
  sp = sampler_settings_from_config(config.get("sample", None) if hasattr(config, "get") else None)
  defaults = dict(r_init=sp.r_init, sigma=sp.sigma, batch_size=sp.batch_size or 100, seed=sp.seed)
  teacher = config.get("teacher", None) if hasattr(config, "get") else None
  if teacher is not None:
    defaults["use_ema"] = bool(teacher.get("use_ema", True))
  kwargs = {**defaults, **{k: v for k, v in ev.items() if v is not None or k == "classifier"}}
  for key in ("teacher_steps", "grid_steps"):
    if key in kwargs:
      kwargs[key] = as_tuple(kwargs[key], int, key)
  clf = kwargs.get("classifier")
  if clf is not None:
    if not hasattr(clf, "items"):
      raise ValueError(f"config.evaluate.classifier must be a dict of classifier settings, got {clf!r}")
    kwargs["classifier"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in clf.items()}
  if "teacher_samplers" in kwargs:
    kwargs["teacher_samplers"] = as_tuple(kwargs["teacher_samplers"] or (), str, "teacher_samplers")
  if "generator_temperatures" in kwargs:
    kwargs["generator_temperatures"] = as_tuple(kwargs["generator_temperatures"], float, "generator_temperatures")
  s = EvalSettings(**kwargs)
  check_settings(s)
  return s


def check_settings(s: EvalSettings):
  if any(t < 1 for t in s.teacher_steps):
    raise ValueError(f"config.evaluate.teacher_steps={list(s.teacher_steps)}: step counts must be >= 1")
  if any(not math.isfinite(t) or t < 0 for t in s.generator_temperatures):
    raise ValueError(f"config.evaluate.generator_temperatures={list(s.generator_temperatures)}: "
                     "temperatures must be finite and >= 0")
  checks = [("per_class", s.per_class >= 0, ">= 0"), ("num_samples", s.num_samples >= 0, ">= 0 (0: per_class x classes)"),
            ("batch_size", s.batch_size >= 1, ">= 1"), ("prdc_k", s.prdc_k >= 1, ">= 1"),
            ("is_splits", s.is_splits >= 1, ">= 1"), ("entropy_samples", s.entropy_samples >= 0, ">= 0 (0: off)"),
            ("timing_repeats", s.timing_repeats >= 0, ">= 0 (0: off)"), ("grid_columns", s.grid_columns >= 0, ">= 0"),
            ("entropy_threshold", 0.0 < s.entropy_threshold < 1.0, "in (0, 1)"),
            ("sigma", 0.0 <= s.sigma <= 1.0, "in [0, 1]"),
            ("reference_image_size", s.reference_image_size >= 1, ">= 1")]
  for name, ok, what in checks:
    if not ok:
      raise ValueError(f"config.evaluate.{name}={getattr(s, name)!r} must be {what}")
  unknown = [n for n in s.teacher_samplers if n not in samplers.SAMPLERS]
  if unknown or len(set(s.teacher_samplers)) != len(s.teacher_samplers):
    raise ValueError(f"config.evaluate.teacher_samplers={list(s.teacher_samplers)}: name each of {list(samplers.SAMPLERS)} "
                     "at most once (empty: config.sample.sampler only)")
  if s.reference_split not in REFERENCE_SPLITS:
    raise ValueError(f"config.evaluate.reference_split={s.reference_split!r} is not valid; choose one of "
                     f"{list(REFERENCE_SPLITS)}")
  r_init_value(s.r_init)
  check_protocol(s.fid_protocol)


def r_init_value(spec, flag: str = "config.evaluate.r_init"):
  """A fixed r_init (number) or ``None`` plus the parsed function for a random range; a bad value is
  a ValueError naming ``flag``."""
  try:
    fn = masking.parse_r_init(float(spec) if isinstance(spec, (int, float)) else spec)
  except ValueError as e:
    raise ValueError(f"{flag}={spec!r} is not valid ({e}); use a number in [0, 1], "
                     "'fix_0.6' or 'random_0.4_0.8'") from e
  if isinstance(spec, (int, float)):
    return float(spec), fn
  if isinstance(spec, str) and spec.startswith("fix_"):
    return float(spec[len("fix_"):]), fn
  return None, fn
