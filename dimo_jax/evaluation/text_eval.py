"""The text masked-diffusion family's runs and evaluation: train, distil and judge a text teacher.

- the corpus (``load_corpus``: ``data.text_corpus``) and its decoding to text (``decode``);
- the teacher (``build_teacher``: ``networks.text_mdm``), trained by ``method.mdm``'s step
  (``train_teacher``) and distilled by ``method.dimo`` unchanged (``distill``);
- the condition source of unconditional data (``conditions``: the label 0 for every example, as
  the token tables of ``configs/tokens.py``);
- the default evaluators (``evaluate``): the causal reference LM (``train_reference``) and the
  rows of ``evaluation.text_metrics`` for the real held-out text, the teacher at every step count
  and sampler and the generator at every step count up to the one it was trained for
  (``generator_sample``: ``core.generator_steps``' chain), every draw exact in float64
  (``core.categorical``); ``write_report`` writes the table, the plot and readable samples.

Trained parameters are cached under ``<workdir>/<name>-<fingerprint>.msgpack`` (flax's msgpack,
written atomically, read against the network's shapes), keyed by the settings that made them,
so a rerun with other distillation settings reuses its teacher and reference LM.
"""

from __future__ import annotations

import hashlib
import io
import json
import functools
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dimo_jax.core import categorical, masking
from dimo_jax.core import generator_steps as gen_steps
from dimo_jax.data import text_corpus
from dimo_jax.data.batching import batch_iterator
from dimo_jax.evaluation import text_metrics
from dimo_jax.evaluation.evaluators import Request, Result, register
from dimo_jax.evaluation.settings import generator_plan
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


@functools.partial(jax.jit, static_argnames=("model", "steps", "schedule", "method"))
def _k_step(model, params, key, labels, r_init, sigma, temperature, *, steps, schedule, method):
  draw = categorical.check_method(method)

  def step_fn(x, k_noise, k_draw):
    logits = model.apply({"params": params}, x, labels, deterministic=True, noise_sigma=sigma,
                         rngs={"noise": k_noise})
    return draw(k_draw, logits[..., :model.codebook_size], temperature)

  k_x, k_noise, k_draw = jax.random.split(key, 3)
  x_init = masking.make_x_init(k_x, labels.shape[0], model.seq_len, model.codebook_size, r_init)
  ratios = gen_steps.step_ratios(schedule, steps, r_init)
  x, _ = gen_steps.chain(step_fn, x_init, (k_noise, k_draw), key, ratios, model.mask_id)
  last = (k_noise, k_draw) if steps == 1 else gen_steps.step_keys(key, steps - 1)[1:]
  return step_fn(x, *last)


def generator_sample(model, params, key, labels, *, steps: int = 1, schedule="linear", r_init=0.6, sigma=0.0,
                     method: str = "gumbel_max"):
  """The generator's samples at ``steps`` steps (``core.generator_steps``: step j >= 1 re-predicts the
  previous output re-masked to the ``schedule``'s level t_j), every position drawn with ``method``
  (the float64 methods inside ``categorical.float64_mode()``). Returns int32 [B, L]; at one step
  the draw of ``categorical.one_step_sample``, key for key."""
  gen_steps.check_schedule(schedule, steps)
  if steps == 1:
    return categorical.one_step_sample(model, params, key, labels, r_init=r_init, sigma=sigma, method=method)
  schedule = schedule if isinstance(schedule, str) else tuple(schedule)
  return _k_step(model, params, key, jnp.asarray(labels, jnp.int32), jnp.float32(r_init), jnp.float32(sigma),
                 jnp.float32(1.0), steps=int(steps), schedule=schedule, method=method)


def generator_name(steps: int) -> str:
  """The row name of the generator at ``steps`` steps."""
  return f"Di[M]O generator {steps}"


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
                log=print, generator_steps: Sequence[int] = (1,), generator_schedule="linear") -> Dict[str, dict]:
  """Every sample set of the table, keyed by row name: ``{"tokens", "model", "sampler", "steps", "seconds"}``:
  the real held-out text, the teacher's rows (``teacher_sets``; cached under ``workdir`` as
  ``teacher_samples-<fingerprint>.npz``, keyed by the teacher's and the sampling settings and ``seed``)
  and the generator at each of ``generator_steps`` (``generator_sample`` with ``generator_schedule`` and
  ``config.evaluate.r_init`` / ``sigma``; the same key at every step count; a tuple of re-masking
  levels is cut to each count's first levels)."""
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
  for steps in (generator_steps if gen_params is not None else ()):
    t0 = time.time()
    with categorical.float64_mode():
      schedule = generator_schedule if isinstance(generator_schedule, str) else tuple(generator_schedule)[:steps - 1]
      x = generator_sample(model, gen_params, jax.random.fold_in(jax.random.key(int(seed)), 10**6), conditions(n),
                           steps=int(steps), schedule=schedule, r_init=float(e.r_init),
                           sigma=float(e.sigma), method=e.categorical)
      x = np.asarray(jax.device_get(x))
    sets[generator_name(int(steps))] = {"tokens": x, "model": "generator", "steps": int(steps),
                                        "sampler": "one step" if steps == 1 else f"{steps} steps",
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
  """The comparison the family is judged by: each generator row's gen. perplexity over the teacher's
  best (over step counts and samplers) and its entropy against the real text's (``generators``, by
  step count; the ``generator_*`` keys are those of the row at the most steps), and the teacher's own
  one step."""
  real = next(r for r in rows if r["model"] == "data")
  teacher = [r for r in rows if r["model"] == "teacher"]
  best = min(teacher, key=lambda r: r["gen_ppl"])
  one = [r for r in teacher if r["steps"] == 1]
  out = {"real_gen_ppl": real["gen_ppl"], "real_entropy": real["entropy"], "teacher_best": best["name"],
         "teacher_best_gen_ppl": best["gen_ppl"],
         "teacher_one_step_gen_ppl": min(r["gen_ppl"] for r in one) if one else float("nan")}
  gens = [{"name": r["name"], "steps": int(r["steps"]), "gen_ppl": r["gen_ppl"], "entropy": r["entropy"],
           "ratio_to_teacher_best": r["gen_ppl"] / best["gen_ppl"],
           "entropy_gap_to_real": r["entropy"] / real["entropy"] - 1.0}
          for r in sorted((r for r in rows if r["model"] == "generator"), key=lambda r: r["steps"])]
  if gens:
    last = gens[-1]
    out.update(generators=gens, generator_steps=last["steps"], generator_gen_ppl=last["gen_ppl"],
               generator_entropy=last["entropy"], ratio_to_teacher_best=last["ratio_to_teacher_best"],
               entropy_gap_to_real=last["entropy_gap_to_real"])
  return out


def _steps_words(steps: int) -> str:
  return "one step" if steps == 1 else f"{steps} steps"


def markdown_table(rows: List[dict], summ: dict) -> str:
  head = ("| samples | steps | gen. PPL | entropy | distinct-1 | distinct-2 | distinct-3 | distinct-4 | "
          "repeated 4-grams | sampling s |\n|---|---|---|---|---|---|---|---|---|---|\n")
  lines = [f"| {r['name']} | {r['steps'] or '-'} | {r['gen_ppl']:.2f} | {r['entropy']:.3f} | "
           f"{r['distinct_1']:.4f} | {r['distinct_2']:.3f} | {r['distinct_3']:.3f} | {r['distinct_4']:.3f} | "
           f"{r['repeat_4']:.3f} | {r['sample_seconds']:.1f} |" for r in rows]
  note = (f"\nTeacher's best: {summ['teacher_best']} (gen. PPL {summ['teacher_best_gen_ppl']:.2f}); its one step: "
          f"{summ['teacher_one_step_gen_ppl']:.2f}; real held-out text: {summ['real_gen_ppl']:.2f} at entropy "
          f"{summ['real_entropy']:.3f}.")
  for g in summ.get("generators", ()):
    note += (f" Di[M]O {_steps_words(g['steps'])}: gen. PPL {g['gen_ppl']:.2f} = "
             f"{g['ratio_to_teacher_best']:.2f}x the teacher's best, entropy "
             f"{100 * g['entropy_gap_to_real']:+.1f}% against the real text's.")
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
  gens = sorted((r for r in rows if r["model"] == "generator"), key=lambda r: r["steps"])
  if gens:
    ax.plot([r["steps"] for r in gens], [r["gen_ppl"] for r in gens], "r*-", markersize=14,
            label="Di[M]O generator (" + ", ".join(str(r["steps"]) for r in gens) + " steps)")
  for r in gens:
    ax.annotate(f"{r['entropy']:.2f}", (r["steps"], r["gen_ppl"]), textcoords="offset points", xytext=(6, -10),
                fontsize=8, color="r")
  for r in rows:
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
def goal_line(summ: dict, ppl_factor: float = 1.5, entropy_tolerance: float = 0.02,
              few_step_factor: float = 1.2) -> str:
  """Whether each generator row meets the family's goal: gen. PPL within ``ppl_factor`` x the teacher's
  best at one step (``few_step_factor`` x at more steps) and unigram entropy within ``entropy_tolerance``
  of the real text's; one clause per step count."""
  gens = summ.get("generators", ())
  if not gens:
    return "Goal: no generator row."
  clauses = []
  for g in gens:
    factor = ppl_factor if g["steps"] == 1 else few_step_factor
    ppl_ok = g["ratio_to_teacher_best"] <= factor
    ent_ok = abs(g["entropy_gap_to_real"]) <= entropy_tolerance
    clauses.append(f"{_steps_words(g['steps'])} {'met' if ppl_ok and ent_ok else 'not met'} (gen. PPL "
                   f"{g['ratio_to_teacher_best']:.2f}x: {'yes' if ppl_ok else 'no'}; entropy "
                   f"{100 * g['entropy_gap_to_real']:+.1f}%: {'yes' if ent_ok else 'no'})")
  more = f" at one step, {few_step_factor}x at more steps" if any(g["steps"] > 1 for g in gens) else ""
  return (f"Goal (gen. PPL within {ppl_factor}x the teacher's best{more}, entropy within "
          f"{100 * entropy_tolerance:.0f}% of the real text's): " + "; ".join(clauses) + ".")


def _generator_plan(config, stored: dict, path: str):
  """``settings.generator_plan`` of a generator folder at ``config.sample.generator_steps``; a bad count
  or a broken record stops with a ``UserError`` naming the folder."""
  try:
    return generator_plan(stored, int(config.sample.get("generator_steps", 0)), f"the generator in {path}")
  except ValueError as e:
    raise UserError(str(e)) from None


@register("text_lm")
def evaluate_text_lm(req: Request, log=print) -> Result:
  """The evaluator ``text_lm`` (the text family's default): the teacher of ``teacher_dir`` at every
  sampler and step count, the generator of ``<workdir>/generator`` at 1 .. k steps (k:
  ``config.sample.generator_steps``, 0 = the ``distill.generator_steps`` its folder records, with its
  ``generator_schedule``) and the real held-out text, judged by the reference LM (trained on the
  training split, cached in the workdir); writes ``gen_ppl.png`` and ``samples.txt`` beside the
  table; ``results.json`` holds the ``summary``."""
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
  gen_params, plan = None, None
  if os.path.isdir(gen_dir):
    _, gen_params, gen_stored = load_network(gen_dir, overrides=overrides)
    plan = _generator_plan(config, gen_stored, gen_dir)
  else:
    log(f"no generator in {gen_dir}: the table has the teacher's and the real text's rows only")
  lm = build_reference_lm(config, corpus)
  lm_params, lm_info = train_reference(config, corpus, lm, workdir=workdir, log=log)
  seed = int(config.evaluate.get("seed", 0))
  sets = sample_sets(config, corpus, model, teacher_params, gen_params, seed=seed, workdir=workdir, log=log,
                     generator_steps=plan.step_counts() if plan else (), generator_schedule=plan and plan.schedule)
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
      plan = _generator_plan(config, stored, path)
      x = generator_sample(model, params, key, conditions(num), steps=plan.steps, schedule=plan.schedule_at(plan.steps),
                           r_init=float(sc.get("r_init", e.r_init)), sigma=float(sc.get("sigma", e.sigma)),
                           method=e.categorical)
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
