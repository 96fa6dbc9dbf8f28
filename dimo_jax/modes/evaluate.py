"""Sample-quality evaluation (``mode=evaluate``): the paper's Table 1 for a teacher and its
one-step Di[M]O generator.

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

Outputs in ``<workdir>/eval/``: ``results.json``, ``table.md`` (``format_table``), ``grid.png``
(rows: teacher at ``evaluate.grid_steps``, then the generator) and ``entropy.png``.
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
  write_json,
)
from dimo_jax.evaluation.settings import EvalSettings, settings_from_config
from dimo_jax.evaluation.tables import format_table, markdown, ratio_note, ratio_to_teacher_best, write_grid
from dimo_jax.method import mdm
from dimo_jax.modes import loop
from dimo_jax.networks import conditioning, maskgit
from dimo_jax.storage import checkpoints, loaders

EVAL_SUBDIR = "eval"
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
GRID_FILE = "grid.png"
ENTROPY_FILE = "entropy.png"


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
  """(teacher (model, params, path) or None, generator (model, params, path) or None)."""
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
    model, params, _ = loaders.load_generator(gen_path, overrides=overrides)
    generator = (model, params, os.path.abspath(gen_path))
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


def run_evaluate(config, workdir: str) -> dict:
  """``mode=evaluate``: samples, metrics and the Table 1 files in ``<workdir>/eval`` (see the
  module docstring). Returns the results dict (also written to ``results.json``)."""
  if (config.get("sample", None) or {}).get("model", "") == "meissonic":  # configs/meissonic.py
    from dimo_jax.modes import evaluate_text  # pylint: disable=import-outside-toplevel
    return evaluate_text.run_text_evaluate(config, workdir)  # HPS v2 / GenEval images
  if not workdir:
    raise ValueError("no workdir given; pass --workdir=<distillation workdir>")
  s = settings_from_config(config)
  sc = config.get("sample", None) if hasattr(config, "get") else None
  out_dir = s.output_dir or os.path.join(os.fspath(workdir), EVAL_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  start = time.time()
  devices = Devices()

  teacher, generator = _load_models(config, s, workdir)
  model = (teacher or generator)[0]
  if teacher is not None:
    teacher = (teacher[0], devices.put_replicated(teacher[1]), teacher[2])
  if generator is not None:
    generator = (generator[0], devices.put_replicated(generator[1]), generator[2])
  num = _num_samples(s, model.num_classes)
  labels = conditioning.balanced_labels(num, model.num_classes)
  batch = devices.round_batch(s.batch_size)
  conditional = model.num_classes > 0

  # The sample sets (their settings are checked before any feature extractor is built).
  sets: List[SampleSet] = []
  if teacher is not None:
    fp = params_fingerprint(teacher[1])
    default_sampler = sc.get("sampler", "confidence") if sc is not None else "confidence"
    teacher_samplers = s.teacher_samplers or (default_sampler,)
    teacher_steps = _teacher_steps(s, teacher[0].seq_len)
    for i, name in enumerate(teacher_samplers):
      # The first sampler's sets keep the plain names (the grid and the sample mode use them).
      sc_i = dict(sc.items() if sc is not None else (), sampler=name)
      prefix = "teacher_" if i == 0 else f"teacher_{name}_"
      for steps in teacher_steps:
        fn, meta = teacher_sample_fn(teacher[0], teacher[1], steps, sc_i)
        sets.append(SampleSet(f"{prefix}steps{steps}", "teacher", int(steps), None,
                              dict(meta, model="teacher", checkpoint=teacher[2], params=fp), fn))
  if generator is not None:
    fp = params_fingerprint(generator[1])
    for temp in s.generator_temperatures:
      fn, meta = generator_sample_fn(generator[0], generator[1], s, sc, temp)
      sets.append(SampleSet(f"generator_temp{temp:g}", "generator", 1, float(temp),
                            dict(meta, model="generator", checkpoint=generator[2], params=fp), fn))

  ds = load_dataset(config, model)
  tokens_on = _token_metrics_on(config, ds)
  if tokens_on and ds.image_shape is None and not (ds.train_labels is not None and ds.num_classes >= 2):
    # Unlabelled token data: the label-free token scores are the whole evaluation.
    ex = Extractors()
    ref_tokens, _ = _reference_tokens(ds, s.reference_split)
    ref = Reference(name=f"{ds.name} {s.reference_split} split", features=Features(), num=int(ref_tokens.shape[0]))
  else:
    ex = build_extractors(config, s, ds, model, out_dir, devices)
    ref = build_reference(s, ds, ex, out_dir)
  scorer = _TokenScorer(s, ds, model, teacher) if tokens_on else None
  logging.info("Evaluating %d samples per row against %s (%d samples), batch %d on %d device(s).", num, ref.name,
               ref.num, batch, devices.count)

  rows, tokens_by_set, counts = [], {}, {}
  multi_temp = len(s.generator_temperatures) > 1
  for sset in sets:
    folder = os.path.join(out_dir, "samples", sset.name)
    tokens, c = generate_set(sset, labels, batch, s.seed, folder, devices)
    tokens_by_set[sset.name], counts[sset.name] = tokens, c
    ms = time_sample_fn(sset.sample_fn, labels[:batch] if num >= batch else np.resize(labels, batch), devices,
                        s.timing_repeats, s.seed)
    feats = compute_features(ex, tokens, os.path.join(folder, "inception.npz"))
    row = dict(name=sset.name, model=sset.model, steps=sset.steps, temperature=sset.temperature,
               num_samples=int(tokens.shape[0]), ms_per_sample=ms)
    if sset.model == "teacher":
      row["sampler"] = sset.meta["sampler"]
      row["label"] = "Teacher" + (f" ({sset.meta['sampler']})" if len(s.teacher_samplers) > 1 else "")
    else:
      row["label"] = "Di[M]O" + (f" (T={sset.temperature:g})" if multi_temp else "")
    row.update(score(feats, labels if conditional else None, ref, s))
    if scorer is not None:
      row.update(scorer(tokens, labels))
    rows.append(row)
    logging.info("%s: %s", sset.name, {k: v for k, v in row.items() if isinstance(v, float)})

  # Real-data floors.
  floors = {}
  if ds is not None and s.real_rows:
    rng = np.random.default_rng(int(s.seed))
    if s.reference_split in ("val", "train"):
      other = "train" if s.reference_split == "val" else "val"
      r_tokens, r_labels = _reference_tokens(ds, other) if (other == "train" or ds.val_tokens.shape[0]) else (None, None)
      if r_tokens is not None and r_tokens.shape[0] > s.prdc_k:
        idx = np.sort(rng.permutation(r_tokens.shape[0])[:num])
        feats = compute_features(ex, r_tokens[idx], os.path.join(out_dir, f"real_{other}_inception.npz"))
        row = dict(name=f"real_{other}", model="real", label=f"Real data ({other} split)", steps=None,
                   num_samples=int(idx.shape[0]), ms_per_sample=None)
        row.update(score(feats, None if r_labels is None else r_labels[idx], ref, s))
        if scorer is not None:
          row.update(scorer(r_tokens[idx], None if r_labels is None else r_labels[idx]))
        rows.append(row)
    all_tokens, all_labels = _reference_tokens(ds, "all")
    perm = rng.permutation(all_tokens.shape[0])
    half = all_tokens.shape[0] // 2
    a_idx, b_idx = np.sort(perm[:half]), np.sort(perm[half:2 * half])
    if half > s.prdc_k:
      fa = compute_features(ex, all_tokens[a_idx], os.path.join(out_dir, "real_half_a_inception.npz"))
      fb = compute_features(ex, all_tokens[b_idx], os.path.join(out_dir, "real_half_b_inception.npz"))
      half_ref = Reference(name="half B", features=fb,
                           inc_stats=metrics.feature_stats(fb.inc_pool) if fb.inc_pool is not None else None,
                           num=int(half))
      row = dict(name="real_halves", model="real", label="Real data (two halves)", steps=None,
                 num_samples=int(half), ms_per_sample=None)
      row.update(score(fa, None if all_labels is None else all_labels[a_idx], half_ref, s))
      if scorer is not None:
        row.update(scorer(all_tokens[a_idx], None if all_labels is None else all_labels[a_idx],
                          reference=all_tokens[b_idx]))
      rows.append(row)
      floors = {k: row[k] for k in ("fd_pixel", "fd_classifier", "fid", "tv_seq", "tv_pair_mean") if k in row}

  results = {
      "title": "Model",
      "num_samples": num,
      "num_devices": devices.count,
      "batch_size": batch,
      "reference": {"name": ref.name, "num": ref.num},
      "floor_two_halves": floors,
      "rows": rows,
      "generation": counts,
      "settings": canonical(dataclasses.asdict(s)),
      "teacher": teacher[2] if teacher is not None else None,
      "generator": generator[2] if generator is not None else None,
  }
  if ex.classifier_meta is not None:
    results["classifier"] = ex.classifier_meta
  if scorer is not None:
    results["token_data"] = scorer.summary()
  results["ratio_to_teacher_best"] = ratio_to_teacher_best(results)

  if s.entropy_samples > 0:
    results["entropy_shift"] = entropy_shift(teacher, generator, s, sc, devices)

  files = {}
  if jax.process_index() == 0:
    grid_order = [f"teacher_steps{t}" for t in s.grid_steps] + [x.name for x in sets if x.model == "generator"]
    grid = write_grid(tokens_by_set, grid_order, s, ex, ds, model.codebook_size, os.path.join(out_dir, GRID_FILE))
    if grid:
      files["grid"] = grid
    if "entropy_shift" in results and any(k in results["entropy_shift"] for k in ("teacher", "generator")):
      save_entropy_png(results["entropy_shift"], os.path.join(out_dir, ENTROPY_FILE))
      files["entropy"] = os.path.join(out_dir, ENTROPY_FILE)
    files["table"] = os.path.join(out_dir, TABLE_FILE)
    files["results"] = os.path.join(out_dir, RESULTS_FILE)
    results["files"] = files
    results["seconds"] = round(time.time() - start, 3)
    with open(files["table"] + ".tmp", "w") as f:
      f.write(markdown(results))
    os.replace(files["table"] + ".tmp", files["table"])
    write_json(files["results"], results)
  else:
    results["seconds"] = round(time.time() - start, 3)
  logging.info("Evaluation (%.1f s):\n%s\n%s", results["seconds"], format_table(results), ratio_note(results))
  return results


run = loop.entry(run_evaluate)  # what ``dimo_jax.main`` calls for ``config.mode='evaluate'``
