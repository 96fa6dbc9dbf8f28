import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from dimo_jax import main as cli
from dimo_jax.core import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, L, K = 64, 8, 6


def _tokens(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, N).astype(np.int32)
  tokens = rng.integers(0, K, (N, L)).astype(np.int32)
  tokens[:, 0] = labels  # a little structure
  np.save(tmp_path / "tokens.npy", tokens)
  np.save(tmp_path / "labels.npy", labels)
  return str(tmp_path / "tokens.npy"), str(tmp_path / "labels.npy")


def _cli(argv, monkeypatch):
  """Parses argv with the command line's flag definitions (fresh flag values per call) and
  runs the mode, as ``main`` does."""
  full = ["dimo_jax.main", *argv]
  fv = flags.FlagValues()
  config, workdir = cli.define_flags(fv, sys_argv=full)
  fv(full)
  return cli.run(config.value, workdir.value)


def test_teacher_then_sample(tmp_path, monkeypatch):
  tok, lab = _tokens(tmp_path)
  workdir = str(tmp_path / "run")
  common = [f"--config={ROOT}/configs/tokens.py", f"--workdir={workdir}", f"--config.data.path={tok}",
            f"--config.data.labels={lab}", "--config.model.width=16", "--config.model.depth=1",
            "--config.model.heads=2", "--config.model.mlp_dim=32"]
  _cli(common + ["--config.mode=teacher", "--config.train.steps=5", "--config.train.batch_size=8",
                 "--config.train.log_every=5", "--config.train.eval_every=0"], monkeypatch)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["5"]
  out = str(tmp_path / "s" / "out.npy")
  _cli(common + ["--config.mode=sample", "--config.sample.num=6", "--config.sample.batch_size=6",
                 "--config.sample.steps=3", f"--config.sample.output={out}", "--config.sample.labels=1,0"], monkeypatch)
  tokens = np.load(out)
  labels = np.load(str(tmp_path / "s" / "out_labels.npy"))
  assert tokens.shape == (6, L) and tokens.min() >= 0 and tokens.max() < K
  np.testing.assert_array_equal(labels, [1, 0, 1, 0, 1, 0])
  assert not os.path.exists(str(tmp_path / "s" / "out.png"))  # tokens are not images here


def test_unknown_mode_from_the_command_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "dimo_jax.main", "--config=configs/tokens.py", f"--workdir={tmp_path}",
       "--config.mode=fly"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown config.mode='fly'" in proc.stderr
  for mode in ("teacher", "sample", "distill", "evaluate"):
    assert mode in proc.stderr


def test_modes_and_errors(tmp_path, monkeypatch):
  from configs import tokens
  c = tokens.get_config()
  c.mode = "fly"
  with pytest.raises(ValueError, match="choose one of teacher, sample, distill, evaluate"):
    cli.run(c, str(tmp_path))
  with pytest.raises(ValueError, match="--workdir"):
    cli.run(tokens.get_config(), "")
  # npy data without a path: the data layer's error.
  c.mode = "teacher"
  with pytest.raises(ValueError, match="data.path"):
    cli.run(c, str(tmp_path / "t"))


def test_multi_process_detection(monkeypatch):
  assert not sharding.is_multi_process_env({})
  assert sharding.is_multi_process_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert sharding.is_multi_process_env({"JAX_NUM_PROCESSES": "4"})
  assert not sharding.is_multi_process_env({"JAX_NUM_PROCESSES": "1"})
  assert sharding.is_multi_process_env({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not sharding.is_multi_process_env({"TPU_WORKER_HOSTNAMES": "a"})
  calls = []
  import jax
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
  assert not sharding.maybe_initialize_distributed(None, environ={})
  assert sharding.maybe_initialize_distributed({"distributed": True}, environ={})
  assert sharding.maybe_initialize_distributed(None, environ={"JAX_COORDINATOR_ADDRESS": "x:1"})
  assert calls == [1, 1]
