"""The paper's Table 1 for a class-conditional teacher and its one-step Di[M]O generator: the
evaluators ``image_sets`` (FID / IS / PRDC, or the pixel- and classifier-space distances) and
``token_tv`` (the label-free token scores) of ``mode=evaluate`` for ``config.family='classes'``.

For the teacher at every step count in ``evaluate.teacher_steps`` and the generator at one step
(at every temperature in ``evaluate.generator_temperatures``), N class-balanced samples are drawn
in batches sharded over all devices and saved in chunks under ``<workdir>/eval/samples/<set>/``
(a rerun after an interruption loads the chunks it finds and draws only the missing ones). The
samples are scored with the feature extractors that apply:

* images (``config.vqgan.checkpoint`` set): tokens -> VQGAN decode -> FID Inception-v3
  (``evaluate.inception_path``): FID against ``evaluate.reference_stats`` (``mu``/``sigma``) or
  against reference images, Inception Score (``evaluate.is_splits``) and precision / recall /
  density / coverage (``evaluate.prdc_k``) against reference features;
* grey-level token images (the data's ``image_shape``): the Frechet distance in pixel space
  (the grey-level token values as a flat vector);
* labelled token data: a classifier trained by the project (``dimo_jax.evaluation.classifier_features``, cached in
  ``evaluate.classifier_dir``): Frechet distance on its features, its accuracy on the
  class-conditional samples and PRDC on its features;
* token data that is neither an image raster nor VQGAN codes (labelled or not):
  the label-free distances of ``evaluation.token_metrics`` to the held-out tokens (TV of every
  single-position and pairwise marginal, the exact sequence TV where ``vocab ** L`` is
  enumerable), the teacher's masked-diffusion bound on the samples (nats per token), their
  diversity and the share breaking structure the training data always holds. Unconditional
  data needs no labels: the sample count defaults to ``DEFAULT_TOKEN_SAMPLES``.

The reference is held-out real data (``evaluate.reference_split``) or the given statistics /
images. Two real-data rows give the floors: a real set (the other split) against the same
reference, and two random halves of the whole data set against each other. Wall time per
sample is measured after compilation. The entropy-shift diagnostic counts, per position, the
tokens with probability above ``evaluate.entropy_threshold`` for the teacher (one step from all
masks) and for the generator (one step from x_init).

The two evaluators share the drawn sample sets and the real-data rows (``prepare``, once per
request) and fill the same rows, each with its columns. Outputs in ``<workdir>/eval/``:
``results.json`` and ``table.md`` (``evaluation.evaluators.write_results``; the table is
``tables.markdown``), ``grid.png`` (rows: teacher at ``evaluate.grid_steps``, then the generator)
and ``entropy.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import List

import jax
import numpy as np
from absl import logging

from dimo_jax.evaluation import metrics, token_metrics
from dimo_jax.evaluation.evaluators import Request, Result, register
from dimo_jax.evaluation.entropy import entropy_shift, save_entropy_png
from dimo_jax.evaluation.features import (
  Extractors,
  Features,
  Reference,
  _reference_tokens,
  build_extractors,
  build_reference,
  compute_features,
  load_dataset,
  score,
)
from dimo_jax.evaluation.sample_sets import (
  Devices,
  SampleSet,
  canonical,
  generate_set,
  generator_sample_fn,
  params_fingerprint,
  teacher_sample_fn,
  time_sample_fn,
)
from dimo_jax.evaluation.settings import EvalSettings, generator_plan, settings_from_config
from dimo_jax.evaluation.settings import sampler_settings_from_config
from dimo_jax.evaluation.tables import markdown, ratio_to_teacher_best, write_grid
from dimo_jax.method import mdm
from dimo_jax.networks import conditioning, maskgit
from dimo_jax.storage import checkpoints, loaders

GRID_FILE = "grid.png"
ENTROPY_FILE = "entropy.png"
FLOOR_METRICS = ("fd_pixel", "fd_classifier", "fid", "tv_seq", "tv_pair_mean")


def _resolve_teacher_path(config, s: EvalSettings, workdir: str) -> str:
  if s.teacher_checkpoint:
    return s.teacher_checkpoint
  teacher = config.get("teacher", None) if hasattr(config, "get") else None
  path = teacher.get("checkpoint", "") if teacher is not None else ""
  if path:
    return path
  stored = checkpoints.read_config(workdir) or {}
  path = (stored.get("teacher") or {}).get("checkpoint", "")
  if path:
    return path
  raise ValueError("no teacher to evaluate: set --config.teacher.checkpoint=<teacher workdir> (or "
                   "--config.evaluate.teacher_checkpoint), or --config.evaluate.teacher_steps='' to "
                   "evaluate the generator only")


def _load_models(config, s: EvalSettings, workdir: str):
  """(teacher (model, params, path) or None, generator (model, params, path, plan) or None); the plan
  (``settings.generator_plan``) holds the step counts of the generator rows."""
  overrides = None
  model_cfg = config.get("model", None) if hasattr(config, "get") else None
  if model_cfg is not None:
    overrides = maskgit.compute_overrides(model_cfg)
  teacher = generator = None
  need_teacher = bool(s.teacher_steps) or s.entropy_samples > 0
  if need_teacher:
    try:
      path = _resolve_teacher_path(config, s, workdir)
    except ValueError:
      if s.teacher_steps:
        raise
      path = None
    if path:
      model, params, _ = loaders.load_teacher(path, use_ema=s.use_ema, overrides=overrides)
      teacher = (model, params, os.path.abspath(path))
  gen_path = s.generator or workdir
  if s.generator or os.path.isdir(loaders.generator_dir(gen_path)):
    model, params, stored = loaders.load_generator(gen_path, overrides=overrides)
    requested = sampler_settings_from_config(config.get("sample", None) if hasattr(config, "get") else None)
    plan = generator_plan(stored, requested.generator_steps, f"the generator in {gen_path}")
    generator = (model, params, os.path.abspath(gen_path), plan)
  elif s.generator_temperatures:
    logging.info("No generator in %s (no %s folder): evaluating the teacher only.", gen_path,
                 loaders.GENERATOR_SUBDIR)
  if teacher is None and generator is None:
    raise ValueError(f"nothing to evaluate: no teacher (config.evaluate.teacher_steps is empty) and no generator "
                     f"in {gen_path!r}; pass --workdir=<distillation workdir> or --config.evaluate.generator")
  if teacher is not None and generator is not None:
    a, b = teacher[0], generator[0]
    if (a.codebook_size, a.seq_len, a.num_classes) != (b.codebook_size, b.seq_len, b.num_classes):
      raise ValueError(f"teacher {teacher[2]!r} (K={a.codebook_size}, L={a.seq_len}, C={a.num_classes}) and "
                       f"generator {generator[2]!r} (K={b.codebook_size}, L={b.seq_len}, C={b.num_classes}) "
                       "differ in sizes; evaluate a generator distilled from this teacher")
  return teacher, generator


# ---------------------------------------------------------------------------- main
DEFAULT_TOKEN_SAMPLES = 5000  # samples per row when neither num_samples nor per_class x classes applies
NLL_SAMPLES = 1000  # samples per row scored by the teacher's bound


def _num_samples(s: EvalSettings, num_classes: int) -> int:
  if s.num_samples > 0:
    return int(s.num_samples)
  if num_classes > 0 and s.per_class > 0:
    return int(s.per_class * num_classes)
  logging.info("config.evaluate.num_samples is 0 and the model is unconditional: %d samples per row.",
               DEFAULT_TOKEN_SAMPLES)
  return DEFAULT_TOKEN_SAMPLES


def _teacher_steps(s: EvalSettings, seq_len: int) -> tuple:
  """The configured step counts up to the sequence length (with L itself when some were cut; when
  none is that short they are kept, and the sampler names the limit)."""
  steps = tuple(int(t) for t in s.teacher_steps if int(t) <= seq_len)
  if not steps:
    return tuple(s.teacher_steps)
  if len(steps) < len(s.teacher_steps) and seq_len not in steps:
    steps = steps + (int(seq_len),)
  return steps


def _token_metrics_on(config, ds) -> bool:
  """Token data that is neither an image raster nor VQGAN codes gets the label-free scores."""
  if ds is None:
    return False
  vq = config.get("vqgan", None) if hasattr(config, "get") else None
  return ds.image_shape is None and not (vq is not None and vq.get("checkpoint", ""))


class _TokenScorer:
  """Label-free scores of token sets against the held-out tokens, with the teacher's bound."""

  def __init__(self, s: EvalSettings, ds, model, teacher):
    self.vocab = int(model.codebook_size)
    self.reference, _ = _reference_tokens(ds, s.reference_split)
    self.rules = token_metrics.find_structure(ds.train_tokens, self.vocab)
    self.baselines = token_metrics.entropy_baselines(ds.train_tokens, self.vocab)
    self.nll_samples = int(NLL_SAMPLES)
    self.teacher = teacher
    self.seed = int(s.seed)

  def nll(self, tokens: np.ndarray, labels) -> float:
    if self.teacher is None or self.nll_samples <= 0:
      return None
    model, params, _ = self.teacher
    n = min(self.nll_samples, tokens.shape[0])
    lab = None if labels is None or model.num_classes == 0 else np.asarray(labels)[:n]
    bound = mdm.nll_bound(conditioning.make_apply_fn(model), params, tokens[:n], lab,
                          mask_id=model.codebook_size, null_label=model.num_classes,
                          key=jax.random.key(self.seed + 17))
    return float(bound.mean())

  def __call__(self, tokens: np.ndarray, labels=None, reference=None) -> dict:
    ref = self.reference if reference is None else reference
    out = token_metrics.token_scores(tokens, ref, self.vocab, self.rules)
    out.pop("tv_pair_at", None)
    out["nll_bound"] = self.nll(tokens, labels)
    return {k: v for k, v in out.items() if v is not None}

  def summary(self) -> dict:
    return {"baselines": self.baselines, "rules": [
        {k: v for k, v in r.items() if k != "table"} for r in self.rules],
            "reference_nll_bound": self.nll(self.reference, None),
            "enumerable": token_metrics.enumerable(self.vocab, self.reference.shape[1])}


# ---------------------------------------------------------------------------- the shared sample sets
@dataclasses.dataclass
class RealSet:
  """A real-data row: its tokens and labels, and for the two-halves row the other half as the
  reference (``other``)."""
  name: str
  label: str
  tokens: np.ndarray
  labels: object
  cache: str
  other: object = None
  other_labels: object = None
  other_cache: str = ""


@dataclasses.dataclass
class Prepared:
  """What both evaluators of the classes family read: settings, models, drawn sets, data."""
  s: EvalSettings
  devices: Devices
  teacher: object
  generator: object
  model: object
  num: int
  labels: np.ndarray
  batch: int
  sets: List[SampleSet]
  tokens: dict
  counts: dict
  base_rows: List[dict]
  ds: object
  tokens_on: bool
  real: List[RealSet]
  start: float
  extractors: Extractors = dataclasses.field(default_factory=Extractors)


def _sample_sets(config, s: EvalSettings, teacher, generator) -> List[SampleSet]:
  """The rows to fill: the teacher at every step count for each sampler, the generator at every
  temperature. Their settings are checked before any feature extractor is built."""
  sc = config.get("sample", None) if hasattr(config, "get") else None
  sets: List[SampleSet] = []
  if teacher is not None:
    fp = params_fingerprint(teacher[1])
    teacher_samplers = s.teacher_samplers or (sampler_settings_from_config(sc).sampler,)
    for i, name in enumerate(teacher_samplers):
      # The first sampler's sets keep the plain names (the grid and the sample mode use them).
      sp = sampler_settings_from_config(sc, sampler=name)
      prefix = "teacher_" if i == 0 else f"teacher_{name}_"
      for steps in _teacher_steps(s, teacher[0].seq_len):
        fn, meta = teacher_sample_fn(teacher[0], teacher[1], steps, sp)
        sets.append(SampleSet(f"{prefix}steps{steps}", "teacher", int(steps), None,
                              dict(meta, model="teacher", checkpoint=teacher[2], params=fp), fn))
  if generator is not None:
    fp, plan = params_fingerprint(generator[1]), generator[3]
    for steps in plan.step_counts():
      for temp in s.generator_temperatures:
        fn, meta = generator_sample_fn(generator[0], generator[1], s, sc, temp, steps, plan.schedule_at(steps))
        sets.append(SampleSet(generator_set_name(steps, temp), "generator", steps, float(temp),
                              dict(meta, model="generator", checkpoint=generator[2], params=fp), fn))
  return sets


def generator_set_name(steps: int, temperature: float) -> str:
  """The name of a generator row: ``generator_temp<T>`` at one step (as before the k-step generator),
  ``generator_steps<k>_temp<T>`` at k > 1."""
  return f"generator_temp{temperature:g}" if steps == 1 else f"generator_steps{steps}_temp{temperature:g}"


def _real_sets(s: EvalSettings, ds, num: int, out_dir: str) -> List[RealSet]:
  """The real-data floors: the other split against the reference, and two random halves."""
  out = []
  if ds is None or not s.real_rows:
    return out
  rng = np.random.default_rng(int(s.seed))
  if s.reference_split in ("val", "train"):
    other = "train" if s.reference_split == "val" else "val"
    r_tokens, r_labels = _reference_tokens(ds, other) if (other == "train" or ds.val_tokens.shape[0]) else (None, None)
    if r_tokens is not None and r_tokens.shape[0] > s.prdc_k:
      idx = np.sort(rng.permutation(r_tokens.shape[0])[:num])
      out.append(RealSet(f"real_{other}", f"Real data ({other} split)", r_tokens[idx],
                         None if r_labels is None else r_labels[idx],
                         os.path.join(out_dir, f"real_{other}_inception.npz")))
  all_tokens, all_labels = _reference_tokens(ds, "all")
  perm = rng.permutation(all_tokens.shape[0])
  half = all_tokens.shape[0] // 2
  a_idx, b_idx = np.sort(perm[:half]), np.sort(perm[half:2 * half])
  if half > s.prdc_k:
    pick = lambda idx: None if all_labels is None else all_labels[idx]  # noqa: E731
    out.append(RealSet("real_halves", "Real data (two halves)", all_tokens[a_idx], pick(a_idx),
                       os.path.join(out_dir, "real_half_a_inception.npz"), all_tokens[b_idx], pick(b_idx),
                       os.path.join(out_dir, "real_half_b_inception.npz")))
  return out


def prepare(req: Request) -> Prepared:
  """Loads the teacher and generator, draws (or loads) every sample set and picks the real rows,
  once per request (``req.shared``); registers the finishing step (floors, ratio, entropy shift,
  grid) and the table."""
  if "classes" in req.shared:
    return req.shared["classes"]
  config, workdir, out_dir = req.config, req.workdir, req.out_dir
  s = settings_from_config(config)
  start = time.time()
  devices = Devices()
  teacher, generator = _load_models(config, s, workdir)
  model = (teacher or generator)[0]
  if teacher is not None:
    teacher = (teacher[0], devices.put_replicated(teacher[1]), teacher[2])
  if generator is not None:
    generator = (generator[0], devices.put_replicated(generator[1]), *generator[2:])
  num = _num_samples(s, model.num_classes)
  labels = conditioning.balanced_labels(num, model.num_classes)
  batch = devices.round_batch(s.batch_size)
  sets = _sample_sets(config, s, teacher, generator)
  ds = load_dataset(config, model)
  tokens, counts, base_rows = {}, {}, []
  multi_temp = len(s.generator_temperatures) > 1
  for sset in sets:
    folder = os.path.join(out_dir, "samples", sset.name)
    tokens[sset.name], counts[sset.name] = generate_set(sset, labels, batch, s.seed, folder, devices)
    ms = time_sample_fn(sset.sample_fn, labels[:batch] if num >= batch else np.resize(labels, batch), devices,
                        s.timing_repeats, s.seed)
    row = dict(name=sset.name, model=sset.model, steps=sset.steps, temperature=sset.temperature,
               num_samples=int(tokens[sset.name].shape[0]), ms_per_sample=ms)
    if sset.model == "teacher":
      row["sampler"] = sset.meta["sampler"]
      row["label"] = "Teacher" + (f" ({sset.meta['sampler']})" if len(s.teacher_samplers) > 1 else "")
    else:
      row["label"] = "Di[M]O" + (f" (T={sset.temperature:g})" if multi_temp else "")
    base_rows.append(row)
  real = _real_sets(s, ds, num, out_dir)
  base_rows += [dict(name=r.name, model="real", label=r.label, steps=None, num_samples=int(r.tokens.shape[0]),
                     ms_per_sample=None) for r in real]
  prep = Prepared(s, devices, teacher, generator, model, num, labels, batch, sets, tokens, counts, base_rows,
                  ds, _token_metrics_on(config, ds), real, start)
  req.shared["classes"] = prep
  req.finish.append(lambda results: _finish(req, prep, results))
  req.format = markdown
  return prep


def _set_rows(prep: Prepared, score_set, score_real) -> List[dict]:
  """The base rows with ``score_set(name, tokens)`` / ``score_real(real_set)`` added."""
  rows = []
  for row in prep.base_rows:
    row = dict(row)
    real = next((r for r in prep.real if r.name == row["name"]), None)
    row.update(score_real(real) if real is not None else score_set(row["name"], prep.tokens[row["name"]]))
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------- the two evaluators
@register("image_sets")
def evaluate_image_sets(req: Request) -> Result:
  """FID / IS / PRDC against the reference (Inception features of decoded VQGAN codes), or the
  pixel-space and classifier-space distances, the classifier's accuracy and PRDC of grey-level and
  labelled token data: one row per sample set and real-data floor."""
  prep = prepare(req)
  s, ds, model = prep.s, prep.ds, prep.model
  if prep.tokens_on and ds.image_shape is None and not (ds.train_labels is not None and ds.num_classes >= 2):
    # Unlabelled token data: no feature space; the label-free token scores are the evaluation.
    ref_tokens, _ = _reference_tokens(ds, s.reference_split)
    ex, ref = Extractors(), Reference(name=f"{ds.name} {s.reference_split} split", features=Features(),
                                      num=int(ref_tokens.shape[0]))
  else:
    ex = build_extractors(req.config, s, ds, model, req.out_dir, prep.devices)
    ref = build_reference(s, ds, ex, req.out_dir)
  prep.extractors = ex
  logging.info("Evaluating %d samples per row against %s (%d samples), batch %d on %d device(s).", prep.num,
               ref.name, ref.num, prep.batch, prep.devices.count)
  conditional = model.num_classes > 0

  def score_set(name, tokens):
    feats = compute_features(ex, tokens, os.path.join(req.out_dir, "samples", name, "inception.npz"))
    return score(feats, prep.labels if conditional else None, ref, s)

  def score_real(r: RealSet):
    feats = compute_features(ex, r.tokens, r.cache)
    if r.other is None:
      return score(feats, r.labels, ref, s)
    fb = compute_features(ex, r.other, r.other_cache)
    half_ref = Reference(name="half B", features=fb, num=int(r.other.shape[0]),
                         inc_stats=metrics.feature_stats(fb.inc_pool) if fb.inc_pool is not None else None)
    return score(feats, r.labels, half_ref, s)

  extra = {"reference": {"name": ref.name, "num": ref.num}}
  if ex.classifier_meta is not None:
    extra["classifier"] = ex.classifier_meta
  return Result(_set_rows(prep, score_set, score_real), extra)


@register("token_tv")
def evaluate_token_tv(req: Request) -> Result:
  """The label-free scores of ``evaluation.token_metrics`` (sequence, position and pair TV against
  the held-out tokens, the teacher's bound, diversity, broken structure) for token data that is
  neither an image raster nor VQGAN codes; nothing for other data."""
  prep = prepare(req)
  if not prep.tokens_on:
    logging.info("token_tv: the data are images (a raster or VQGAN codes); no token scores.")
    return Result([], {})
  scorer = _TokenScorer(prep.s, prep.ds, prep.model, prep.teacher)
  rows = _set_rows(prep, lambda name, tokens: scorer(tokens, prep.labels),
                   lambda r: scorer(r.tokens, r.labels, reference=r.other))
  return Result(rows, {"token_data": scorer.summary()})


def _finish(req: Request, prep: Prepared, results: dict) -> None:
  """The classes family's entries of ``results.json`` around the rows: sizes, the two-halves
  floor, the ratio to the teacher's best, the entropy shift, the grid and entropy PNGs."""
  s = prep.s
  halves = next((r for r in results["rows"] if r["name"] == "real_halves"), {})
  ordered = {"title": "Model", "num_samples": prep.num, "num_devices": prep.devices.count,
             "batch_size": prep.batch, "reference": results.pop("reference", None),
             "floor_two_halves": {k: halves[k] for k in FLOOR_METRICS if k in halves},
             "rows": results.pop("rows"), "generation": prep.counts,
             "settings": canonical(dataclasses.asdict(s)),
             "teacher": prep.teacher[2] if prep.teacher is not None else None,
             "generator": prep.generator[2] if prep.generator is not None else None}
  rest = dict(results)
  results.clear()
  results.update(ordered, **rest)
  results["ratio_to_teacher_best"] = ratio_to_teacher_best(results)
  if s.entropy_samples > 0:
    sc = req.config.get("sample", None) if hasattr(req.config, "get") else None
    results["entropy_shift"] = entropy_shift(prep.teacher, prep.generator, s, sc, prep.devices)
  files = {}
  if jax.process_index() == 0:
    grid_order = [f"teacher_steps{t}" for t in s.grid_steps] + [x.name for x in prep.sets if x.model == "generator"]
    grid = write_grid(prep.tokens, grid_order, s, prep.extractors, prep.ds, prep.model.codebook_size,
                      os.path.join(req.out_dir, GRID_FILE))
    if grid:
      files["grid"] = grid
    if "entropy_shift" in results and any(k in results["entropy_shift"] for k in ("teacher", "generator")):
      save_entropy_png(results["entropy_shift"], os.path.join(req.out_dir, ENTROPY_FILE))
      files["entropy"] = os.path.join(req.out_dir, ENTROPY_FILE)
  results["files"] = files
  results["seconds"] = round(time.time() - prep.start, 3)
