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

Writes ``<out>/step_memory.json`` and ``.md`` when ``--out`` is given; prints the table.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Any, Dict, Sequence

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from dimo_jax.method import dimo
from dimo_jax.networks import maskgit
from experiments import benchmark  # noqa: E402  pylint: disable=wrong-import-position

ALL_POLICIES = ("none", *maskgit.REMAT_POLICIES)
GB = 1e9


def parse_policies(text: str) -> Sequence[str]:
  names = [p.strip() for p in str(text).split(",") if p.strip()]
  bad = [p for p in names if p not in ALL_POLICIES]
  if not names or bad:
    raise ValueError(f"--remat={text!r}: pass a comma-separated list of {list(ALL_POLICIES)}, "
                     f"e.g. --remat=none,full" + (f" (unknown: {bad})" if bad else ""))
  return names


def step_memory(config, remat: str, batch: int = 0) -> Dict[str, Any]:
  """XLA's buffer sizes of the config's distillation step (state donated) with ``remat``."""
  parse_policies(remat)
  cfg = benchmark.prepare_config(config, benchmark.BenchmarkOptions(remat=remat, batch=batch))
  model = maskgit.build_model(cfg.model, **benchmark.data_sizes(cfg))
  dist = dimo.build_distiller(cfg, model)
  state = jax.eval_shape(lambda: dist.init_state(maskgit.init_params(model, jax.random.key(0)), 0))
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
  t0 = time.perf_counter()
  compiled = jax.jit(dist.step, donate_argnums=0).lower(state).compile()
  compile_s = time.perf_counter() - t0
  mem = benchmark.compiled_memory(compiled)
  if not mem or "estimated_bytes" not in mem:
    raise RuntimeError(f"the {jax.default_backend()} backend gave no memory analysis of the compiled step")
  return {"remat": remat, "batch": dist.s.batch_size, "state_bytes": state_bytes,
          "lower_and_compile_s": compile_s, **mem}


def markdown(record: Dict[str, Any]) -> str:
  budget = record.get("budget_gb")
  lines = [f"XLA's memory analysis of the distillation step: `{record['command']}`", "",
           f"Backend {record['backend']} ({record['device_kind']}), jax {record['jax_version']}, "
           f"{record['date']}; model {record['model']}; batch {record['rows'][0]['batch']}.", "",
           "| remat | state (GB) | temporaries (GB) | arguments + outputs - aliased + temporaries (GB) |"
           + (f" within {budget:g} GB |" if budget else "") + " compile (s) |",
           "|---|---|---|---|" + ("---|" if budget else "") + "---|"]
  for r in record["rows"]:
    total = r["estimated_bytes"] / GB
    fits = (" yes |" if total <= budget else " no |") if budget else ""
    lines.append(f"| {r['remat']} | {r['state_bytes'] / GB:.2f} | {r['temp_size_in_bytes'] / GB:.2f} | "
                 f"{total:.2f} |{fits} {r['lower_and_compile_s']:.0f} |")
  return "\n".join(lines) + "\n"


def run(config, policies: Sequence[str], batch: int = 0, budget_gb: float = 0.0, out: str = "",
        command: str = "") -> Dict[str, Any]:
  rows = []
  for remat in policies:
    rows.append(step_memory(config, remat, batch))
    r = rows[-1]
    print(f"remat {remat}: state {r['state_bytes'] / GB:.2f} GB, temporaries {r['temp_size_in_bytes'] / GB:.2f} GB, "
          f"estimated total {r['estimated_bytes'] / GB:.2f} GB ({r['lower_and_compile_s']:.0f} s)", flush=True)
  m = config.model
  device = jax.devices()[0]
  record = {"command": command or "step_memory.run(...)", "date": datetime.date.today().isoformat(),
            "backend": jax.default_backend(), "device_kind": device.device_kind, "jax_version": jax.__version__,
            "model": f"{m.get('arch', 'preln')} {m.depth} x {m.width}, compute {m.get('dtype', 'float32')}",
            "budget_gb": budget_gb or None, "rows": rows}
  table = markdown(record)
  print(table)
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "step_memory.json"), "w") as f:
      json.dump(record, f, indent=1)
    with open(os.path.join(out, "step_memory.md"), "w") as f:
      f.write(table)
  return record


def define_flags():
  """The command-line flags, defined only when run as a script (tests import this module)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<file>.py).", lock_config=False)
  flags.DEFINE_string("remat", ",".join(ALL_POLICIES), "Comma-separated rematerialisation policies.")
  flags.DEFINE_integer("batch", 0, "Global distillation batch (0: config.distill.batch_size).")
  flags.DEFINE_float("budget_gb", 0.0, "Device memory to compare against (0: no column).")
  flags.DEFINE_string("out", "", "Directory for step_memory.json and step_memory.md.")


def main(argv):
  del argv
  fv = flags.FLAGS
  if fv.config is None:
    raise app.UsageError("pass --config=configs/<file>.py")
  run(fv.config, parse_policies(fv.remat), fv.batch, fv.budget_gb, fv.out, command="python " + " ".join(sys.argv))


if __name__ == "__main__":
  define_flags()
  app.run(main)
