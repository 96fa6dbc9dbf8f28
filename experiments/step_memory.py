"""Will the distillation step fit? XLA's memory analysis of the step, per rematerialisation policy.

Nothing is allocated: the state is abstract (``jax.eval_shape``), the step is lowered and
compiled for the local backend, and ``compiled.memory_analysis()`` gives the bytes of the
arguments (the state), of the outputs and of the temporaries (activations kept for the two
backward passes, the teacher's logits, ...). Compile on the backend you will train on: the
temporaries differ between backends (on the full MaskGIT step without rematerialisation the CPU's
estimate was 24 % above the H100's). One device; a sharded step divides the arguments and the batch's
temporaries over the mesh.

  python experiments/step_memory.py --config=configs/maskgit.py:1 --batch=64 --out=/tmp/step_memory
  python experiments/step_memory.py --config=configs/maskgit.py:1 --config.model.depth=2 \
      --config.model.width=128 --config.model.heads=4 --batch=8 --remat=none,full --budget_gb=8
  python experiments/step_memory.py --config=configs/maskgit.py:1 --batch=64 --remat= \
      --levers=base,attention=xla_saved,remat=none,teacher_dtype=bfloat16,donate=0,guidance=split,host=callback

A lever row changes some settings of the config's step and keeps the rest: ``remat``, ``attention``
(``model.attention_impl``: ``xla_saved`` keeps the float32 attention probabilities for the backward
pass), ``teacher_dtype`` (the frozen teacher's parameters held in that dtype), ``donate`` (``0``: the
state not donated), ``guidance`` (``split``: the teacher's two guidance branches as two calls of B rows
instead of one of 2B), ``host`` (``callback``: the metrics sent to the host inside the step). Each row
reports XLA's FLOPs of the compiled step (a scanned layer stack counted once) and the host transfers
found in its HLO.

Writes ``<out>/step_memory.json`` and ``.md`` when ``--out`` is given; prints the table.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Sequence

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position

from dimo_jax.method import dimo  # noqa: E402  pylint: disable=wrong-import-position
from dimo_jax.networks import attention, maskgit  # noqa: E402  pylint: disable=wrong-import-position
from experiments import benchmark  # noqa: E402  pylint: disable=wrong-import-position

ALL_POLICIES = ("none", *maskgit.REMAT_POLICIES)
GB = 1e9

# The settings a lever row may change, each with what the config's step does by default.
LEVER_DEFAULTS = {"remat": "", "attention": "", "teacher_dtype": "", "donate": "1", "guidance": "batched",
                  "host": "none"}
LEVER_CHOICES = {"remat": ("", *ALL_POLICIES), "attention": attention.IMPLEMENTATIONS,
                 "teacher_dtype": ("", "float32", "bfloat16"), "donate": ("0", "1"),
                 "guidance": ("batched", "split"), "host": ("none", "callback")}
# Host round-trips in a compiled program: Python callbacks, infeed / outfeed, send / recv.
_HOST_OPS = re.compile(r'custom_call_target="[^"]*callback[^"]*"|\b(?:infeed|outfeed|send|recv)\(')


def parse_policies(text: str) -> Sequence[str]:
  names = [p.strip() for p in str(text).split(",") if p.strip()]
  bad = [p for p in names if p not in ALL_POLICIES]
  if not names or bad:
    raise ValueError(f"--remat={text!r}: pass a comma-separated list of {list(ALL_POLICIES)}, "
                     f"e.g. --remat=none,full" + (f" (unknown: {bad})" if bad else ""))
  return names


def parse_levers(text: str) -> List[Dict[str, str]]:
  """``--levers``: rows separated by ``,``, each ``base`` or settings ``key=value`` joined by ``+``
  (``remat=none+attention=xla_saved``); every setting left out keeps ``LEVER_DEFAULTS``."""
  rows = []
  for spec in (r.strip() for r in str(text).split(",")):
    if not spec:
      continue
    row = dict(LEVER_DEFAULTS)
    for item in ([] if spec == "base" else spec.split("+")):
      key, sep, value = item.partition("=")
      key, value = key.strip(), value.strip()
      if not sep or key not in LEVER_CHOICES or value not in LEVER_CHOICES[key]:
        raise ValueError(f"--levers: {item!r} in row {spec!r} is not a setting; write key=value with "
                         + "; ".join(f"{k} in {list(v)}" for k, v in LEVER_CHOICES.items())
                         + ", joined by '+' (or 'base'), rows separated by ','")
      row[key] = value
    row["label"] = spec
    rows.append(row)
  if not rows:
    raise ValueError(f"--levers={text!r} names no row; e.g. --levers=base,attention=xla_saved,remat=dots")
  return rows


def host_round_trips(compiled) -> int:
  """How many host transfers (callbacks, infeed / outfeed, send / recv) the compiled program holds."""
  return len(_HOST_OPS.findall(compiled.as_text()))


def _split_guided(dist: dimo.Distiller):
  """The Distiller's guidance as two network calls of B rows (the conditional and the null class)
  instead of one of 2B: the unbatched side of the lever."""
  def guided(apply, x_t, labels, neg, weight, ratio=None, schedule="constant"):
    if weight == 1.0 and schedule == "constant":
      return apply(x_t, labels)
    cond = apply(x_t, labels)
    uncond = apply(x_t, jnp.full_like(labels, dist.num_classes) if neg is None else neg)
    w = jnp.float32(weight)
    if schedule == "linear":
      w = w * (1.0 - ratio)[:, None, None]
    return uncond + w * (cond - uncond)
  return guided


def step_memory(config, remat: str = "", batch: int = 0, compiler_options=None, **levers) -> Dict[str, Any]:
  """XLA's buffer sizes and FLOPs of the config's distillation step with ``remat`` and the lever
  settings ``levers`` (keys of ``LEVER_DEFAULTS``; by default the state donated, guidance batched),
  compiled with ``compiler_options`` (None: XLA's defaults)."""
  lever = {**LEVER_DEFAULTS, **levers, "remat": remat or levers.get("remat", "")}
  if lever["remat"]:
    parse_policies(lever["remat"])
  cfg = benchmark.prepare_config(config, benchmark.BenchmarkOptions(
      remat=lever["remat"], batch=batch, attention=lever["attention"]))
  model = maskgit.build_model(cfg.model, **benchmark.data_sizes(cfg))
  dist = dimo.build_distiller(cfg, model)
  state = jax.eval_shape(lambda: dist.init_state(maskgit.init_params(model, jax.random.key(0)), 0))
  if lever["teacher_dtype"]:
    state = jax.eval_shape(lambda s: s.replace(
        teacher_params=maskgit.cast_floating(s.teacher_params, lever["teacher_dtype"])), state)
  if lever["guidance"] == "split":
    dist._guided = _split_guided(dist)  # pylint: disable=protected-access
  step = dist.step
  if lever["host"] == "callback":
    def step(s):  # the metrics sent to the host inside the step, as a per-step print would
      new, metrics = dist.step(s)
      jax.debug.callback(lambda m: None, metrics)
      return new, metrics
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
  t0 = time.perf_counter()
  donate = (0,) if lever["donate"] == "1" else ()
  compiled = jax.jit(step, donate_argnums=donate).lower(state).compile(compiler_options=compiler_options)
  compile_s = time.perf_counter() - t0
  mem = benchmark.compiled_memory(compiled)
  if not mem or "estimated_bytes" not in mem:
    raise RuntimeError(f"the {jax.default_backend()} backend gave no memory analysis of the compiled step")
  try:
    flops = benchmark.cost_flops(compiled.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    flops = None
  return {**lever, "remat": model.remat, "attention": model.attention_impl or "", "batch": dist.s.batch_size,
          "state_bytes": state_bytes, "lower_and_compile_s": compile_s, "flops_compiled": flops,
          "host_round_trips": host_round_trips(compiled), **mem}


def markdown(record: Dict[str, Any]) -> str:
  budget = record.get("budget_gb")
  lines = [f"XLA's memory analysis of the distillation step: `{record['command']}`", "",
           f"Backend {record['backend']} ({record['device_kind']}), jax {record['jax_version']}, "
           f"{record['date']}; model {record['model']}; batch {record['rows'][0]['batch']}.", "",
           "| lever | remat | attention | state (GB) | arguments (GB) | temporaries (GB) | "
           "arguments + outputs - aliased + temporaries (GB) |" + (f" within {budget:g} GB |" if budget else "")
           + " XLA FLOPs (scan body once) | host round-trips | compile (s) |",
           "|---|---|---|---|---|---|---|" + ("---|" if budget else "") + "---|---|---|"]
  for r in record["rows"]:
    total = r["estimated_bytes"] / GB
    fits = (" yes |" if total <= budget else " no |") if budget else ""
    flops = "-" if r.get("flops_compiled") is None else f"{r['flops_compiled'] / 1e12:.2f} T"
    lines.append(f"| {r.get('label', r['remat'])} | {r['remat']} | {r['attention'] or 'xla (default)'} | "
                 f"{r['state_bytes'] / GB:.2f} | {r['argument_size_in_bytes'] / GB:.2f} | "
                 f"{r['temp_size_in_bytes'] / GB:.2f} | {total:.2f} |{fits} {flops} | {r['host_round_trips']} | "
                 f"{r['lower_and_compile_s']:.0f} |")
  return "\n".join(lines) + "\n"


def run(config, policies: Sequence[str] = (), batch: int = 0, budget_gb: float = 0.0, out: str = "",
        command: str = "", levers: Sequence[Dict[str, str]] = ()) -> Dict[str, Any]:
  """One row per remat policy in ``policies``, then one per lever row (``parse_levers``)."""
  specs = [{**LEVER_DEFAULTS, "remat": p, "label": p} for p in policies] + list(levers)
  rows = []
  for spec in specs:
    settings = {k: v for k, v in spec.items() if k != "label"}
    rows.append({**step_memory(config, batch=batch, **settings), "label": spec["label"]})
    r = rows[-1]
    print(f"{r['label']}: state {r['state_bytes'] / GB:.2f} GB, temporaries {r['temp_size_in_bytes'] / GB:.2f} GB, "
          f"estimated total {r['estimated_bytes'] / GB:.2f} GB ({r['lower_and_compile_s']:.0f} s)", flush=True)
    if out:  # each row is kept as it comes: a full-size compile takes minutes
      _write(out, _record(config, rows, budget_gb, command))
  record = _record(config, rows, budget_gb, command)
  print(markdown(record))
  if out:
    _write(out, record)
  return record


def _record(config, rows, budget_gb, command) -> Dict[str, Any]:
  m = config.model
  device = jax.devices()[0]
  return {"command": command or "step_memory.run(...)", "date": datetime.date.today().isoformat(),
          "backend": jax.default_backend(), "device_kind": device.device_kind, "jax_version": jax.__version__,
          "model": f"{m.get('arch', 'preln')} {m.depth} x {m.width}, compute {m.get('dtype', 'float32')}",
          "budget_gb": budget_gb or None, "rows": rows}


def _write(out: str, record: Dict[str, Any]):
  """``step_memory.json`` and ``.md`` under ``out``, each written to a temporary name and renamed."""
  os.makedirs(out, exist_ok=True)
  for name, text in (("step_memory.json", json.dumps(record, indent=1)), ("step_memory.md", markdown(record))):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


def define_flags():
  """The command-line flags, defined only when run as a script (tests import this module)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py).", lock_config=False)
  flags.DEFINE_string("remat", ",".join(ALL_POLICIES), "Comma-separated rematerialisation policies "
                      "(empty with --levers: lever rows only).")
  flags.DEFINE_string("levers", "", "Lever rows: ',' between rows, each 'base' or key=value settings joined "
                      "by '+' (remat, attention, teacher_dtype, donate, guidance, host).")
  flags.DEFINE_integer("batch", 0, "Global distillation batch (0: config.distill.batch_size).")
  flags.DEFINE_float("budget_gb", 0.0, "Device memory to compare against (0: no column).")
  flags.DEFINE_string("out", "", "Directory for step_memory.json and step_memory.md.")


def main(argv):
  del argv
  fv = flags.FLAGS
  if fv.config is None:
    raise app.UsageError("pass --config=configs/<file>.py")
  levers = parse_levers(fv.levers) if fv.levers else []
  policies = parse_policies(fv.remat) if (fv.remat or not levers) else []
  run(fv.config, policies, fv.batch, fv.budget_gb, fv.out, command="python " + " ".join(sys.argv), levers=levers)


if __name__ == "__main__":
  define_flags()
  app.run(main)
