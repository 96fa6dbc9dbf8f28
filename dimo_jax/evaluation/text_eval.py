"""The text masked-diffusion family's runs and evaluation: train, distil and judge a text teacher.

- the corpus (``load_corpus``: ``data.text_corpus``) and its decoding to text (``decode``);
- the teacher (``build_teacher``: ``networks.text_mdm``), trained by ``method.mdm``'s step
  (``train_teacher``) and distilled by ``method.dimo`` unchanged (``distill``);
- the condition source of unconditional data (``conditions``: the label 0 for every example, as
  the token tables of ``configs/tokens.py``);
- the default evaluators (``evaluate``): the causal reference LM (``train_reference``) and the
  rows of ``evaluation.text_metrics`` for the real held-out text, the teacher at every step count
  and sampler and the generator at one step, every draw exact in float64
  (``core.categorical``); ``write_report`` writes the table, the plot and readable samples.

Trained parameters are cached under ``<workdir>/<name>-<fingerprint>.msgpack`` (flax's msgpack,
written atomically, read against the network's shapes), keyed by the settings that made them,
so a rerun with other distillation settings reuses its teacher and reference LM.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Callable, Dict, List, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dimo_jax.core import categorical
from dimo_jax.data import text_corpus
from dimo_jax.data.batching import batch_iterator
from dimo_jax.evaluation import text_metrics
from dimo_jax.evaluation.evaluators import Request, Result, register
from dimo_jax.method import dimo, mdm
from dimo_jax.networks import causal_lm, conditioning, maskgit, text_mdm
from dimo_jax.storage import checkpoints, loaders
from dimo_jax.storage.checkpoints import UserError, atomic_write_bytes

TEACHER_SUBDIR = "teacher"  # where mode=distill trains the teacher when config.teacher.checkpoint is empty


# ---------------------------------------------------------------------------- data, networks, conditions
def load_corpus(config) -> text_corpus.TextCorpus:
  return text_corpus.load_text_corpus(config.data)


def build_teacher(config, corpus) -> text_mdm.TextMaskTransformer:
  return text_mdm.build_model(config.model, vocab_size=corpus.vocab_size, seq_len=corpus.seq_len)


def build_reference_lm(config, corpus) -> causal_lm.CausalLM:
  return causal_lm.build_model(config.evaluate.reference_lm, vocab_size=corpus.vocab_size,
                               seq_len=corpus.seq_len)


def conditions(batch: int) -> np.ndarray:
  """The labels of unconditional text: 0 for every example (``num_classes`` is 0)."""
  return conditioning.balanced_labels(batch, 0)


def bos_id(corpus) -> int:
  """The token the reference LM reads before a sequence: the document separator (or id 0)."""
  return int(corpus.sep_id) if corpus.sep_id >= 0 else 0


def teacher_dir(config, workdir: str) -> str:
  """``config.teacher.checkpoint``, or ``<workdir>/teacher`` when it is empty."""
  return config.teacher.get("checkpoint", "") or os.path.join(os.fspath(workdir), TEACHER_SUBDIR)


def stored_network(stored: Optional[dict], path: str) -> dict:
  """The ``text_network`` entry (vocabulary, sequence length, separator) of a folder's ``config.json``."""
  net = (stored or {}).get("text_network")
  if not net:
    raise UserError(f"{path}: its config.json has no 'text_network' entry (vocabulary, sequence length); "
                    "give a workdir written by --config=configs/text.py --config.mode=teacher")
  return net


def load_network(path: str, *, use_ema: bool = True, overrides: Optional[dict] = None):
  """``(model, params, stored_config)`` of a text teacher or generator folder (its latest checkpoint,
  EMA parameters by default); a missing folder names the command that makes it."""
  if not path or not os.path.isdir(path):
    raise UserError(f"no text checkpoint at {path!r}; train one with `python -m dimo_jax.main "
                    "--config=configs/text.py --workdir=<dir> --config.mode=teacher` (or --config.mode=distill)")
  params, ema, stored = checkpoints.load_params(path)
  net = stored_network(stored, path)
  model_cfg = dict(stored.get("model", {}), **(overrides or {}))
  model = text_mdm.build_model(ml_collections.ConfigDict(model_cfg), vocab_size=int(net["vocab_size"]),
                               seq_len=int(net["seq_len"]))
  return model, (ema if (use_ema and ema is not None) else params), stored


def decode_stored(tokens, stored: dict) -> List[str]:
  """One string per row of ``tokens [N, L]`` with the tokenizer of the corpus a stored run names
  (bytes need no corpus; BPE and ``npy`` read the corpus again)."""
  data_cfg = ml_collections.ConfigDict(stored.get("data", {}))
  if data_cfg.get("name", "embedded") != "npy" and data_cfg.get("tokenizer", "bytes") == "bytes":
    tok = text_corpus.ByteTokenizer()
    return [tok.decode(row) for row in np.asarray(tokens)]
  return decode(text_corpus.load_text_corpus(data_cfg), tokens)


def decode(corpus, tokens) -> List[str]:
  """One string per row of ``tokens``; token ids when the corpus has no tokenizer (``npy``)."""
  tokens = np.asarray(tokens)
  if corpus.tokenizer is None:
    return [" ".join(map(str, row.tolist())) for row in tokens]
  return [corpus.decode(row) for row in tokens]


# ---------------------------------------------------------------------------- the parameter cache
def fingerprint(*parts) -> str:
  text = json.dumps([p.to_dict() if hasattr(p, "to_dict") else p for p in parts], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached(workdir: Optional[str], name: str, key: str, template, make: Callable, log=print):
  """``make()`` -> ``(params, info)``, or the params and info stored under ``workdir`` for ``key``."""
  if not workdir:
    return make()
  path = os.path.join(workdir, f"{name}-{key}.msgpack")
  if os.path.exists(path):
    with open(path, "rb") as f:
      try:
        stored = flax.serialization.msgpack_restore(f.read())
        params = flax.serialization.from_state_dict(template, stored["params"])
      except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable or of another network ({str(err)[:100]}); delete it to retrain") from err
    log(f"{name}: read {path}")
    return params, json.loads(stored["info"])
  params, info = make()
  blob = {"params": flax.serialization.to_state_dict(jax.device_get(params)), "info": json.dumps(info)}
  atomic_write_bytes(path, flax.serialization.msgpack_serialize(blob))
  return params, info


# ---------------------------------------------------------------------------- training
def train_teacher(config, corpus, model, *, workdir: Optional[str] = None, log=print):
  """The teacher trained with ``method.mdm``'s step on the training split; its EMA parameters and
  ``{"val_loss": masked cross-entropy on the held-out split, "seconds"}``."""
  t = config.train
  settings = mdm.TeacherSettings.from_config(t)

  def make():
    tx = settings.optimizer()
    step = jax.jit(mdm.make_train_step(
        model, tx, mask_id=model.mask_id, num_classes=0, schedule=settings.mask_schedule,
        exact=settings.exact_mask, loss_on=settings.loss_on, ema_decay=settings.ema_decay,
        lr_schedule=settings.schedule()), donate_argnums=0)
    state = mdm.init_train_state(model, tx, int(config.seed))
    batches = batch_iterator(np.asarray(corpus.dataset.train_tokens), None, int(t.batch_size), int(config.seed))
    labels = jnp.asarray(conditions(int(t.batch_size)))
    t0 = time.time()
    for i in range(settings.steps):
      tokens, _ = next(batches)
      state, metrics = step(state, jnp.asarray(tokens), labels)
      if (i + 1) % max(1, settings.steps // 5) == 0:
        log(f"teacher step {i + 1}/{settings.steps}: loss {float(metrics['loss']):.3f}")
    seconds = time.time() - t0
    val = mdm.evaluate_val_loss(conditioning.make_apply_fn(model), state.ema_params, corpus.dataset.val_tokens,
                                None, mask_id=model.mask_id, null_label=0, key=jax.random.key(0),
                                schedule=settings.mask_schedule, loss_on="masked")
    return state.ema_params, {"val_loss": val["val_loss"], "seconds": seconds}

  template = jax.eval_shape(model.init_params, jax.random.key(0))
  key = fingerprint(config.data, config.model, t, config.seed)
  return cached(workdir, "teacher", key, template, make, log)


def distill(config, model, teacher_params, *, seed: int, log=print):
  """Di[M]O (``method.dimo``, unchanged) from the teacher; the generator's EMA parameters and
  ``{"seconds", "last": the last step's metrics}``."""
  distiller = dimo.build_distiller(config, model)
  state = distiller.init_state(teacher_params, seed=int(seed))
  step, state = distiller.jit_step(state)
  steps = int(config.distill.steps)
  t0 = time.time()
  metrics = {}
  for i in range(steps):
    state, metrics = step(state)
    if (i + 1) % max(1, steps // 5) == 0:
      log(f"distill step {i + 1}/{steps}: token divergence {float(metrics['gen/token_divergence']):.4f}, "
          f"aux loss {float(metrics['aux/loss']):.3f}")
  last = {k: float(v) for k, v in jax.device_get(metrics).items()}
  return state.ema_params, {"seconds": time.time() - t0, "last": last}


def train_reference(config, corpus, lm, *, workdir: Optional[str] = None, log=print):
  """The causal reference LM trained on the training split; its parameters and info."""
  r = config.evaluate.reference_lm

  def make():
    return text_metrics.train_reference_lm(
        lm, corpus.dataset.train_tokens, steps=int(r.steps), batch_size=int(r.batch_size), lr=float(r.lr),
        seed=int(r.seed), bos=bos_id(corpus), log=log)

  template = jax.eval_shape(lm.init_params, jax.random.key(0))
  return cached(workdir, "reference_lm", fingerprint(config.data, r), template, make, log)


# ---------------------------------------------------------------------------- evaluation
def teacher_step_counts(config, seq_len: int) -> List[int]:
  """``config.evaluate.teacher_steps`` up to the sequence length, and the sequence length itself."""
  return sorted({int(s) for s in config.evaluate.teacher_steps if int(s) <= seq_len} | {int(seq_len)})


def teacher_sets(config, corpus, model, teacher_params, *, seed: int, log=print) -> Dict[str, dict]:
  """The teacher's sample sets, each sampler at each step count (``teacher_step_counts``), float64 draws."""
  e = config.evaluate
  labels = conditions(int(e.num_samples))
  apply_fn = conditioning.make_apply_fn(model)
  key = jax.random.key(int(seed))
  sets = {}
  with categorical.float64_mode():
    for sampler in e.teacher_samplers:
      for steps in teacher_step_counts(config, corpus.seq_len):
        t0 = time.time()
        x = categorical.iterative_sample(
            apply_fn, teacher_params, jax.random.fold_in(key, steps), labels, seq_len=corpus.seq_len,
            codebook_size=model.codebook_size, steps=steps, order=sampler, schedule=e.sampler_schedule,
            r_temp=float(e.r_temp), method=e.categorical)
        x = np.asarray(jax.device_get(x))
        sets[f"teacher {sampler} {steps}"] = {"tokens": x, "model": "teacher", "sampler": sampler, "steps": steps,
                                              "seconds": time.time() - t0}
      log(f"teacher samples ({sampler}) drawn")
  return sets


def _save_sets(path: str, sets: Dict[str, dict]) -> None:
  buf = io.BytesIO()
  np.savez(buf, names=np.asarray(list(sets)), **{f"tokens_{i}": s["tokens"] for i, s in enumerate(sets.values())},
           meta=np.asarray(json.dumps([{k: v for k, v in s.items() if k != "tokens"} for s in sets.values()])))
  atomic_write_bytes(path, buf.getvalue())


def _load_sets(path: str) -> Dict[str, dict]:
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z["meta"]))
    return {str(name): dict(m, tokens=z[f"tokens_{i}"]) for i, (name, m) in enumerate(zip(z["names"], meta))}


def sample_sets(config, corpus, model, teacher_params, gen_params, *, seed: int, workdir: Optional[str] = None,
                log=print) -> Dict[str, dict]:
  """Every sample set of the table, keyed by row name: ``{"tokens", "model", "sampler", "steps", "seconds"}``:
  the real held-out text, the teacher's rows (``teacher_sets``; cached under ``workdir`` as
  ``teacher_samples-<fingerprint>.npz``, keyed by the teacher's and the sampling settings and ``seed``)
  and the generator's one step (its ``config.evaluate.r_init`` / ``sigma``)."""
  e = config.evaluate
  n = int(e.num_samples)
  val = np.asarray(corpus.dataset.val_tokens)
  real = val[np.random.default_rng(int(seed)).permutation(val.shape[0])[:n]]
  sets = {"real held-out text": {"tokens": real, "model": "data", "sampler": "-", "steps": 0, "seconds": 0.0}}
  sampling = {k: e.get(k) for k in ("num_samples", "teacher_steps", "teacher_samplers", "sampler_schedule",
                                    "r_temp", "categorical")}
  path = workdir and os.path.join(workdir, "teacher_samples-" + fingerprint(
      config.data, config.model, config.train, config.seed, sampling, seed) + ".npz")
  if path and os.path.exists(path):
    sets.update(_load_sets(path))
    log(f"teacher samples: read {path}")
  else:
    teacher = teacher_sets(config, corpus, model, teacher_params, seed=seed, log=log)
    if path:
      _save_sets(path, teacher)
    sets.update(teacher)
  if gen_params is not None:
    t0 = time.time()
    with categorical.float64_mode():
      x = categorical.one_step_sample(model, gen_params, jax.random.fold_in(jax.random.key(int(seed)), 10**6),
                                      conditions(n), r_init=float(e.r_init), sigma=float(e.sigma),
                                      method=e.categorical)
      x = np.asarray(jax.device_get(x))
    sets["Di[M]O generator 1"] = {"tokens": x, "model": "generator", "sampler": "one step", "steps": 1,
                                  "seconds": time.time() - t0}
  return sets


def evaluate(config, corpus, sets: Dict[str, dict], lm, lm_params) -> List[dict]:
  """One row of ``text_metrics.text_row`` per sample set (plus its name, model, sampler, steps)."""
  apply_fn = text_metrics.lm_apply_fn(lm)
  rows = []
  for name, s in sets.items():
    row = text_metrics.text_row(s["tokens"], lm_apply=apply_fn, lm_params=lm_params, bos=bos_id(corpus))
    rows.append({"name": name, "model": s["model"], "sampler": s["sampler"], "steps": s["steps"],
                 "sample_seconds": s["seconds"], **row})
  return rows


def summary(rows: List[dict]) -> dict:
  """The comparison the family is judged by: the generator's gen. perplexity over the teacher's best
  (over step counts and samplers), its entropy against the real text's, and the teacher's own one step."""
  real = next(r for r in rows if r["model"] == "data")
  teacher = [r for r in rows if r["model"] == "teacher"]
  gen = next((r for r in rows if r["model"] == "generator"), None)
  best = min(teacher, key=lambda r: r["gen_ppl"])
  one = [r for r in teacher if r["steps"] == 1]
  out = {"real_gen_ppl": real["gen_ppl"], "real_entropy": real["entropy"], "teacher_best": best["name"],
         "teacher_best_gen_ppl": best["gen_ppl"],
         "teacher_one_step_gen_ppl": min(r["gen_ppl"] for r in one) if one else float("nan")}
  if gen is not None:
    out.update(generator_gen_ppl=gen["gen_ppl"], generator_entropy=gen["entropy"],
               ratio_to_teacher_best=gen["gen_ppl"] / best["gen_ppl"],
               entropy_gap_to_real=gen["entropy"] / real["entropy"] - 1.0)
  return out


def markdown_table(rows: List[dict], summ: dict) -> str:
  head = ("| samples | steps | gen. PPL | entropy | distinct-1 | distinct-2 | distinct-3 | distinct-4 | "
          "repeated 4-grams | sampling s |\n|---|---|---|---|---|---|---|---|---|---|\n")
  lines = [f"| {r['name']} | {r['steps'] or '-'} | {r['gen_ppl']:.2f} | {r['entropy']:.3f} | "
           f"{r['distinct_1']:.4f} | {r['distinct_2']:.3f} | {r['distinct_3']:.3f} | {r['distinct_4']:.3f} | "
           f"{r['repeat_4']:.3f} | {r['sample_seconds']:.1f} |" for r in rows]
  note = (f"\nTeacher's best: {summ['teacher_best']} (gen. PPL {summ['teacher_best_gen_ppl']:.2f}); its one step: "
          f"{summ['teacher_one_step_gen_ppl']:.2f}; real held-out text: {summ['real_gen_ppl']:.2f} at entropy "
          f"{summ['real_entropy']:.3f}.")
  if "ratio_to_teacher_best" in summ:
    note += (f" Di[M]O one step: gen. PPL {summ['generator_gen_ppl']:.2f} = "
             f"{summ['ratio_to_teacher_best']:.2f}x the teacher's best, entropy "
             f"{100 * summ['entropy_gap_to_real']:+.1f}% against the real text's.")
  return head + "\n".join(lines) + "\n" + note + "\n"


def plot(rows: List[dict], path: str) -> None:
  """Generative perplexity against steps (log-log) per teacher sampler, the generator's point and the
  real text's level; each point labelled with its entropy."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for sampler in sorted({r["sampler"] for r in rows if r["model"] == "teacher"}):
    pts = sorted((r["steps"], r["gen_ppl"], r["entropy"]) for r in rows if r["model"] == "teacher"
                 and r["sampler"] == sampler)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"teacher, {sampler}")
    for s, g, h in pts:
      ax.annotate(f"{h:.2f}", (s, g), textcoords="offset points", xytext=(3, 4), fontsize=7)
  for r in rows:
    if r["model"] == "generator":
      ax.plot([1], [r["gen_ppl"]], "r*", markersize=14, label="Di[M]O generator, 1 step")
      ax.annotate(f"{r['entropy']:.2f}", (1, r["gen_ppl"]), textcoords="offset points", xytext=(6, -10),
                  fontsize=8, color="r")
    if r["model"] == "data":
      ax.axhline(r["gen_ppl"], color="k", ls="--", lw=1, label=f"real held-out text (entropy {r['entropy']:.2f})")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sampling steps")
  ax.set_ylabel("generative perplexity (reference LM)")
  ax.set_title("Text Di[M]O: gen. perplexity against steps (labels: mean unigram entropy)", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def write_extras(outdir: str, corpus, rows: List[dict], sets: Dict[str, dict], num_text: int = 6) -> Dict[str, str]:
  """``gen_ppl.png`` (``plot``) and ``samples.txt`` (``num_text`` decoded samples per set) in ``outdir``;
  returns their paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = {"plot": os.path.join(outdir, "gen_ppl.png"), "samples": os.path.join(outdir, "samples.txt")}
  plot(rows, paths["plot"])
  parts = []
  for name, s in sets.items():
    parts.append(f"=== {name} ===")
    for i, text in enumerate(decode(corpus, s["tokens"][:num_text])):
      parts.append(f"--- {i}\n{text}")
  atomic_write_bytes(paths["samples"], ("\n".join(parts) + "\n").encode("utf-8"))
  return paths


def write_report(outdir: str, corpus, rows: List[dict], sets: Dict[str, dict], info: dict,
                 num_text: int = 6) -> Dict[str, str]:
  """``results.json``, ``table.md``, ``gen_ppl.png`` and ``samples.txt`` (``num_text`` decoded samples per
  set) in ``outdir``; returns their paths."""
  os.makedirs(outdir, exist_ok=True)
  summ = summary(rows)
  paths = {"json": os.path.join(outdir, "results.json"), "table": os.path.join(outdir, "table.md")}
  atomic_write_bytes(paths["json"], json.dumps({"rows": rows, "summary": summ, "info": info}, indent=1,
                                               default=float).encode())
  atomic_write_bytes(paths["table"], markdown_table(rows, summ).encode())
  return dict(paths, **write_extras(outdir, corpus, rows, sets, num_text))


# ---------------------------------------------------------------------------- mode=evaluate and mode=sample
def goal_line(summ: dict, ppl_factor: float = 1.5, entropy_tolerance: float = 0.02) -> str:
  """Whether the generator meets the family's goal: gen. PPL within ``ppl_factor`` x the teacher's
  best and unigram entropy within ``entropy_tolerance`` of the real text's."""
  if "ratio_to_teacher_best" not in summ:
    return "Goal: no generator row."
  ppl_ok = summ["ratio_to_teacher_best"] <= ppl_factor
  ent_ok = abs(summ["entropy_gap_to_real"]) <= entropy_tolerance
  verdict = "met" if ppl_ok and ent_ok else "not met"
  return (f"Goal (gen. PPL within {ppl_factor}x the teacher's best, entropy within {100 * entropy_tolerance:.0f}% "
          f"of the real text's): {verdict} (gen. PPL {summ['ratio_to_teacher_best']:.2f}x: "
          f"{'yes' if ppl_ok else 'no'}; entropy {100 * summ['entropy_gap_to_real']:+.1f}%: "
          f"{'yes' if ent_ok else 'no'}).")


@register("text_lm")
def evaluate_text_lm(req: Request, log=print) -> Result:
  """The evaluator ``text_lm`` (the text family's default): the teacher of ``teacher_dir`` at every
  sampler and step count, the generator of ``<workdir>/generator`` at one step and the real held-out
  text, judged by the reference LM (trained on the training split, cached in the workdir); writes
  ``gen_ppl.png`` and ``samples.txt`` beside the table; ``results.json`` holds the ``summary``."""
  config, workdir = req.config, req.workdir
  corpus = load_corpus(config)
  overrides = maskgit.compute_overrides(config.model)
  model, teacher_params, stored = load_network(teacher_dir(config, workdir),
                                               use_ema=bool(config.teacher.get("use_ema", True)), overrides=overrides)
  net = stored_network(stored, teacher_dir(config, workdir))
  if (int(net["vocab_size"]), int(net["seq_len"])) != (corpus.vocab_size, corpus.seq_len):
    raise UserError(f"the teacher in {teacher_dir(config, workdir)} has vocabulary {net['vocab_size']} and "
                    f"sequence length {net['seq_len']}, the config's corpus {corpus.vocab_size} and {corpus.seq_len}; "
                    "give the config.data the teacher was trained with")
  gen_dir = loaders.generator_dir(workdir)
  gen_params = load_network(gen_dir, overrides=overrides)[1] if os.path.isdir(gen_dir) else None
  if gen_params is None:
    log(f"no generator in {gen_dir}: the table has the teacher's and the real text's rows only")
  lm = build_reference_lm(config, corpus)
  lm_params, lm_info = train_reference(config, corpus, lm, workdir=workdir, log=log)
  seed = int(config.evaluate.get("seed", 0))
  sets = sample_sets(config, corpus, model, teacher_params, gen_params, seed=seed, workdir=workdir, log=log)
  rows = evaluate(config, corpus, sets, lm, lm_params)
  summ = summary(rows)
  files = write_extras(req.out_dir, corpus, rows, sets) if jax.process_index() == 0 else {}
  req.format = lambda results: markdown_table(results["rows"], results["summary"]) + goal_line(results["summary"]) + "\n"
  return Result(rows=rows, extra={"summary": summ, "goal": goal_line(summ), "reference_lm": lm_info,
                                  "corpus": corpus.source, "seed": seed, "files": dict(files)})


def write_text_samples(config, workdir: str) -> dict:
  """``mode=sample`` of the text family: ``config.sample.num`` sequences from the teacher of
  ``config.sample.checkpoint`` (default the workdir or its ``teacher`` folder; ``config.sample.steps``
  steps of ``config.sample.sampler``) or, with ``config.sample.model='generator'``, the generator's one step;
  writes ``<output>.npy`` (token ids) and ``<output>.txt`` (one decoded sample per block). Returns the
  paths and ``num``."""
  sc = config.sample
  kind = sc.get("model", "teacher")
  if kind not in ("teacher", "generator"):
    raise UserError(f"config.sample.model={kind!r} is not known; choose teacher or generator")
  num = int(sc.num)
  if num < 1:
    raise UserError(f"config.sample.num must be >= 1, got {num}")
  path = sc.get("checkpoint", "") or workdir
  if kind == "generator" and os.path.isdir(loaders.generator_dir(path)):
    path = loaders.generator_dir(path)
  elif kind == "teacher" and not sc.get("checkpoint", "") and os.path.isdir(os.path.join(path, TEACHER_SUBDIR)):
    path = os.path.join(path, TEACHER_SUBDIR)
  model, params, stored = load_network(path, overrides=maskgit.compute_overrides(config.model))
  output = sc.get("output", "") or os.path.join(workdir or path, "samples.npy")
  if not output.endswith(".npy"):
    raise UserError(f"config.sample.output={output!r} must name a .npy file, e.g. /tmp/samples.npy")
  key = jax.random.key(int(sc.get("seed", 0)))
  e = config.evaluate
  with categorical.float64_mode():
    if kind == "generator":
      x = categorical.one_step_sample(model, params, key, conditions(num), r_init=float(sc.get("r_init", e.r_init)),
                                      sigma=float(sc.get("sigma", e.sigma)), method=e.categorical)
    else:
      x = categorical.iterative_sample(
          conditioning.make_apply_fn(model), params, key, conditions(num), seq_len=model.seq_len,
          codebook_size=model.codebook_size, steps=int(sc.steps), order=sc.get("sampler", "confidence"),
          schedule=e.sampler_schedule, r_temp=float(e.r_temp), method=e.categorical)
  tokens = np.asarray(jax.device_get(x)).astype(np.int32)
  texts = decode_stored(tokens, stored)
  paths = {"tokens": output, "text": output[: -len(".npy")] + ".txt"}
  if jax.process_index() == 0:
    buf = io.BytesIO()
    np.save(buf, tokens)
    atomic_write_bytes(paths["tokens"], buf.getvalue())
    atomic_write_bytes(paths["text"], "".join(f"=== sample {i} ===\n{t}\n" for i, t in enumerate(texts)).encode())
  log_line = f"Wrote {num} {kind} samples from {path} to {paths['text']}"
  print(log_line, flush=True)
  return dict(paths, num=num)
