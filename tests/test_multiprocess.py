"""Multi-process runs on one machine: JAX's distributed runtime with two processes on localhost.

Each process simulates two CPU devices (``--xla_force_host_platform_device_count``) and joins the
other through ``jax.distributed`` (gloo collectives on the CPU), started by the project itself from
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (``core.sharding``). The
reference is one process with four devices. Both run ``mode=teacher`` and ``mode=distill``
(with the evaluation table at the end) through ``dimo_jax.main.run``, parameters and optimizer
states split over all four devices; the two-process runs stop halfway and are restarted as fresh
processes that resume from the checkpoints, the teacher's latest one damaged in between.

Checked: the same teacher and distillation states as the one-process run at every checkpoint;
each process reading its half of every global batch; one checkpoint per step, readable by a
single process; the damaged step moved aside once, by process 0, and the run resumed from the one
before; process 1 writing nothing but its part of the orbax checkpoints (no config, TensorBoard
events, sample grids, evaluation samples or table; the table printed by process 0 only).

This file is also the worker: ``python tests/test_multiprocess.py <spec.json>``.
"""

from __future__ import annotations

import builtins
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4  # in all: one process with 4, or two with 2 each
TEACHER_STEPS = 4
DISTILL_STEPS = 4
HALF = 2  # the two-process runs stop here (a checkpoint step) and resume in new processes
# The cross-process sums (gloo) add in another order than one process's: float32 rounding apart,
# the states agree (measured: at most 1.2e-7 after 4 steps).
TOLERANCE = 1e-6
TIMEOUT_S = 420  # one launch (both processes); a hang or a crash of one stops both


# ---------------------------------------------------------------------------- the worker
def tiny_config(mode: str, teacher_dir: str = "", outputs: bool = False):
  """A tiny digits run: 1-layer model, batch 16, checkpoints at every teacher step and every
  second distillation step; ``outputs``: the teacher's sample grid at the end, and distillation
  ends with a small evaluation (table, grid)."""
  from configs import digits  # pylint: disable=import-outside-toplevel
  c = digits.get_config()
  c.mode = mode
  c.model.width = 32
  c.model.depth = 1
  c.model.heads = 2
  c.model.mlp_dim = 512  # its [32, 512] kernels are split over the 4 devices (fsdp_shardings' minimum size)
  c.model.dropout = 0.1  # dropout keys must agree across processes too
  c.sample.steps = 2
  c.mesh.data = 1
  c.mesh.fsdp = DEVICES  # parameters and optimizer states sharded across both processes
  for section, steps in ((c.train, TEACHER_STEPS), (c.distill, DISTILL_STEPS)):
    section.steps = steps
    section.batch_size = 16
    section.warmup_steps = 1
    section.checkpoint_every = HALF
    section.keep_checkpoints = 0  # all
    section.log_every = HALF
    section.sample_every = 0
    # Adam's epsilon far above the rounding noise of gradients that are zero in exact arithmetic
    # (attention's key bias; the generator's first step, where generator, auxiliary and teacher
    # coincide): at 1e-8 Adam turns that noise, which depends on the order of the cross-device
    # sums, into full-size steps, and the runs could only be compared loosely.
    section.eps = 1e-3
  c.train.checkpoint_every = 1
  c.train.sample_every = TEACHER_STEPS if outputs else 0  # the evaluation draws the generator's grid
  c.train.eval_every = 0
  c.train.eval_batch_size = 64
  c.distill.aux_updates = 1
  c.distill.evaluate_at_end = outputs
  c.teacher.checkpoint = teacher_dir
  c.evaluate.teacher_steps = (2,)
  c.evaluate.teacher_samplers = ("confidence",)
  c.evaluate.per_class = 2
  c.evaluate.batch_size = 20
  c.evaluate.entropy_samples = 0
  c.evaluate.timing_repeats = 0
  c.evaluate.real_rows = False
  c.evaluate.grid_steps = (2,)
  c.evaluate.classifier = dict(steps=10, feature_dim=8)
  return c


class _WriteAudit:
  """Records the files this process writes (``open`` for writing, ``os.replace`` / ``os.rename``
  targets) under ``root``."""

  def __init__(self, root: str):
    self.root = os.path.realpath(root)
    self.paths = set()

  def _note(self, path):
    try:
      path = os.path.realpath(os.fspath(path))
    except TypeError:  # a file descriptor
      return
    if path.startswith(self.root + os.sep):
      self.paths.add(os.path.relpath(path, self.root))

  def install(self):
    real_open, real_replace, real_rename = builtins.open, os.replace, os.rename

    def audited_open(file, mode="r", *args, **kwargs):
      if any(c in mode for c in "wax+"):
        self._note(file)
      return real_open(file, mode, *args, **kwargs)

    def audited_replace(src, dst, *args, **kwargs):
      self._note(dst)
      return real_replace(src, dst, *args, **kwargs)

    def audited_rename(src, dst, *args, **kwargs):
      self._note(dst)
      return real_rename(src, dst, *args, **kwargs)

    builtins.open, os.replace, os.rename = audited_open, audited_replace, audited_rename


def _worker(spec_path: str):
  """Runs the spec's modes through ``dimo_jax.main.run`` and writes what it saw to ``spec.out``."""
  with open(spec_path) as f:
    spec = json.load(f)
  sys.path.insert(0, ROOT)
  audit = _WriteAudit(spec["root"])
  audit.install()

  import jax  # pylint: disable=import-outside-toplevel
  from dimo_jax import main  # pylint: disable=import-outside-toplevel
  from dimo_jax.data import batching  # pylint: disable=import-outside-toplevel

  seen = {"batches": [], "shards": []}
  real_iterator = batching.batch_iterator

  def recording_iterator(tokens, labels, batch_size, seed, **kwargs):
    seen["shards"].append([kwargs.get("shard_index", 0), kwargs.get("num_shards", 1), int(batch_size)])
    step = int(kwargs.get("start_step", 0))
    for tokens_k, labels_k in real_iterator(tokens, labels, batch_size, seed, **kwargs):
      seen["batches"].append([step, np.asarray(tokens_k).tolist()])
      step += 1
      yield tokens_k, labels_k

  batching.batch_iterator = recording_iterator
  results = {}
  for run in spec["runs"]:
    config = tiny_config(run["mode"], run.get("teacher", ""), run.get("outputs", False))
    section = config.train if run["mode"] == "teacher" else config.distill
    if run.get("stop_after"):
      section.stop_after = run["stop_after"]
    start = time.time()
    out = main.run(config, run["workdir"])
    results[run["mode"]] = dict({k: v for k, v in out.items() if isinstance(v, (int, float, str))},
                                seconds=round(time.time() - start, 1))
  with open(spec["out"] + ".tmp", "w") as f:
    json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
               "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
               "results": results, "shards": seen["shards"], "batches": seen["batches"],
               "writes": sorted(audit.paths)}, f)
  os.replace(spec["out"] + ".tmp", spec["out"])


# ---------------------------------------------------------------------------- launching
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(tmp, name: str, runs, num_processes: int) -> list:
  """Starts ``num_processes`` workers (``DEVICES / num_processes`` CPU devices each), waits for
  all of them (``TIMEOUT_S``), and returns their reports; kills every one left on any failure.

  The workers audit their writes under ``tmp/work``; they share a compilation cache in
  ``tmp/jax_cache`` (the restarted run compiles nothing new)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // num_processes}",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for var in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "TPU_WORKER_HOSTNAMES"):
    env.pop(var, None)
  if num_processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES=str(num_processes))
  procs, logs, outs = [], [], []
  try:
    for i in range(num_processes):
      spec = {"root": str(tmp / "work"), "runs": runs, "out": str(tmp / f"{name}_{i}.json")}
      spec_path = tmp / f"{name}_{i}.spec.json"
      spec_path.write_text(json.dumps(spec))
      log = open(tmp / f"{name}_{i}.log", "w")  # pylint: disable=consider-using-with
      out_log = open(tmp / f"{name}_{i}.stdout", "w")  # pylint: disable=consider-using-with
      logs += [log, out_log]
      outs.append(spec["out"])
      proc_env = dict(env, JAX_PROCESS_ID=str(i)) if num_processes > 1 else env
      procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(spec_path)], cwd=ROOT,
                                    env=proc_env, stdout=out_log, stderr=log, start_new_session=True))
    deadline = time.time() + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed or time.time() > deadline:
        break  # a process that died leaves the other waiting on collectives: stop both
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        p.wait()
    for log in logs:
      log.close()
  codes = [p.returncode for p in procs]
  if codes != [0] * num_processes:
    tails = "\n".join(f"--- {name} process {i} (exit {c}):\n" + (tmp / f"{name}_{i}.log").read_text()[-3000:]
                      for i, c in enumerate(codes))
    raise AssertionError(f"{name}: the workers did not all finish (exit codes {codes}; "
                         f"{TIMEOUT_S} s limit)\n{tails}")
  reports = []
  for out in outs:
    with open(out) as f:
      reports.append(json.load(f))
  return reports


# ---------------------------------------------------------------------------- the test
def _state(workdir: str, step: int):
  """The whole stored state at ``step`` (every array), read by this single process."""
  from dimo_jax.storage import checkpoints  # pylint: disable=import-outside-toplevel
  with checkpoints.Checkpointer(checkpoints.checkpoint_dir(workdir), max_to_keep=None, async_save=False,
                                read_only=True) as ckpt:
    return ckpt.restore(step)


def _max_diff(a, b) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  worst = 0.0
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    if x.size:
      worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
  return worst


def _steps(workdir) -> list:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _events(workdir) -> list:
  return [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]


def _truncate_data(step_dir):
  """Cuts every data file of a checkpoint step (both processes' parts) to a third."""
  files = [f for f in glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  assert files
  for name in files:
    with open(name, "r+b") as f:
      f.truncate(os.path.getsize(name) // 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  t1, d1, t2, d2 = (str(tmp / "work" / n) for n in ("teacher_1p", "distill_1p", "teacher_2p", "distill_2p"))
  one = _launch(tmp, "one", [{"mode": "teacher", "workdir": t1},
                             {"mode": "distill", "workdir": d1, "teacher": t1}], 1)
  first = _launch(tmp, "first", [{"mode": "teacher", "workdir": t2, "stop_after": HALF},
                                 {"mode": "distill", "workdir": d2, "teacher": t1, "stop_after": HALF}], 2)
  after_first = {w: _steps(w) for w in (t2, d2)}
  _truncate_data(os.path.join(t2, "checkpoints", str(HALF)))  # the teacher resumes from step HALF - 1
  second = _launch(tmp, "second", [{"mode": "teacher", "workdir": t2, "outputs": True},
                                   {"mode": "distill", "workdir": d2, "teacher": t1, "outputs": True}], 2)
  return dict(tmp=tmp, t1=t1, d1=d1, t2=t2, d2=d2, one=one, first=first, second=second, after_first=after_first)


def test_two_processes_join_one_runtime(runs):
  (one,) = runs["one"]
  assert (one["process_count"], one["device_count"]) == (1, DEVICES)
  for launch in ("first", "second"):
    for i, report in enumerate(runs[launch]):
      assert (report["process_index"], report["process_count"]) == (i, 2)
      assert (report["device_count"], report["local_device_count"]) == (DEVICES, DEVICES // 2)


def test_same_states_as_one_process(runs):
  """The teacher's and the distillation's whole states (parameters, EMA, optimizer states, step,
  key; generator, auxiliary and teacher copy) at every checkpoint of the two-process runs, and
  the exported generator, equal the one-process run's."""
  from dimo_jax.storage import checkpoints  # pylint: disable=import-outside-toplevel
  diffs = {}
  for name, a, b in (("teacher", runs["t1"], runs["t2"]), ("distill", runs["d1"], runs["d2"])):
    for step in _steps(b):
      diffs[f"{name} step {step}"] = _max_diff(_state(a, step), _state(b, step))
  assert sorted(diffs) == ([f"distill step {s}" for s in (HALF, DISTILL_STEPS)]
                           + [f"teacher step {s}" for s in range(1, TEACHER_STEPS + 1)])
  g1, e1, _ = checkpoints.load_params(os.path.join(runs["d1"], "generator"))
  g2, e2, _ = checkpoints.load_params(os.path.join(runs["d2"], "generator"))
  diffs["generator"] = max(_max_diff(g1, g2), _max_diff(e1, e2))
  assert all(d <= TOLERANCE for d in diffs.values()), diffs
  one_results = runs["one"][0]["results"]
  for report in runs["second"]:
    for mode, key in (("teacher", "val_loss"), ("distill", "gen/token_divergence")):
      assert report["results"][mode]["step"] == one_results[mode]["step"]
      np.testing.assert_allclose(report["results"][mode][key], one_results[mode][key], rtol=1e-4, atol=1e-7)


def test_each_process_reads_its_share(runs):
  (one,) = runs["one"]
  assert one["shards"] == [[0, 1, 16]]
  assert [k for k, _ in one["batches"]] == list(range(TEACHER_STEPS))
  reference = np.asarray([b for _, b in one["batches"]])  # [steps, 16, L]
  parts = []
  for i in range(2):
    first, second = runs["first"][i], runs["second"][i]
    assert first["shards"] == second["shards"] == [[i, 2, 8]]
    # Steps 0-1, then 1-3 after the restart from the checkpoint of step 1.
    assert [k for k, _ in first["batches"]] == [0, 1] and [k for k, _ in second["batches"]] == [1, 2, 3]
    by_step = dict(first["batches"])
    np.testing.assert_array_equal(by_step[1], second["batches"][0][1])  # step 1 again: the same rows
    by_step.update(second["batches"])
    parts.append(np.asarray([by_step[k] for k in range(TEACHER_STEPS)]))
    assert parts[-1].shape[:2] == (TEACHER_STEPS, 8)
  np.testing.assert_array_equal(np.concatenate(parts, axis=1), reference)


def test_checkpoints_written_once_and_resumed(runs):
  assert runs["after_first"] == {runs["t2"]: [1, HALF], runs["d2"]: [HALF]}
  for first in runs["first"]:
    assert first["results"]["teacher"]["step"] == HALF and first["results"]["distill"]["step"] == HALF
    assert "val_loss" not in first["results"]["teacher"] and "table" not in first["results"]["distill"]
  assert _steps(runs["t1"]) == _steps(runs["t2"]) == list(range(1, TEACHER_STEPS + 1))
  assert _steps(runs["d2"]) == [HALF, DISTILL_STEPS]
  # The damaged step was moved aside once, by process 0, and written again by the resumed run.
  teacher_ckpts = os.path.join(runs["t2"], "checkpoints")
  assert sorted(n for n in os.listdir(teacher_ckpts) if not n.isdigit()) == [f"{HALF}.corrupt-1"]
  moved = os.path.join("teacher_2p", "checkpoints", f"{HALF}.corrupt-1")
  assert moved in runs["second"][0]["writes"] and moved not in runs["second"][1]["writes"]
  assert not [n for n in os.listdir(os.path.join(runs["d2"], "checkpoints")) if not n.isdigit()]


def test_process_zero_alone_writes_logs_grids_and_table(runs):
  for workdir in ("t2", "d2"):
    assert len(_events(runs[workdir])) == 2, _events(runs[workdir])  # one per launch, process 0's
  assert os.path.isfile(os.path.join(runs["t2"], "samples", f"step_{TEACHER_STEPS:07d}.png"))
  assert os.path.isfile(os.path.join(runs["d2"], "eval", "grid.png"))
  with open(os.path.join(runs["d2"], "eval", "table.md")) as f:
    table = f.read()
  assert "Di[M]O" in table and "Teacher" in table, table
  for launch in ("first", "second"):
    zero, one = runs[launch]
    assert any(p.endswith("config.json") for p in zero["writes"])
    if launch == "second":
      for name in ("table.md", "results.json", "grid.png", f"step_{TEACHER_STEPS:07d}.png", "chunk_00000.npz"):
        assert any(p.endswith(name) for p in zero["writes"]), name
    # Process 1 writes its part of the orbax checkpoints and nothing else.
    others = [p for p in one["writes"] if "checkpoints" not in p.split(os.sep)]
    assert not others, others
  printed = [(runs["tmp"] / f"second_{i}.stdout").read_text() for i in range(2)]
  assert "Di[M]O" in printed[0] and "Di[M]O" not in printed[1]


def test_distributed_args_from_the_environment():
  from dimo_jax.core import sharding  # pylint: disable=import-outside-toplevel
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:12355", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert sharding.is_multi_process_env(env)
  assert sharding.distributed_args(env) == {"coordinator_address": "10.0.0.1:12355", "num_processes": 2,
                                            "process_id": 1}
  assert sharding.distributed_args({"JAX_NUM_PROCESSES": "4"}) == {"num_processes": 4}  # the rest: JAX's detection
  assert sharding.is_multi_process_env({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not sharding.is_multi_process_env({"JAX_NUM_PROCESSES": "1"}) and sharding.distributed_args({}) == {}
  assert not sharding.maybe_initialize_distributed(None, environ={})
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
    sharding.distributed_args(dict(env, JAX_PROCESS_ID="2"))
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
    sharding.distributed_args(dict(env, JAX_NUM_PROCESSES="two"))


if __name__ == "__main__":
  _worker(sys.argv[1])
