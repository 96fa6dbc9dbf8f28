"""The text family through the command line: teacher, distillation (the teacher trained first when the
workdir holds none), the text table of mode=evaluate, decoded samples of mode=sample, and bad text input
refused with exit status 2 and a line naming the file and the fix."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from dimo_jax import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = f'''
import importlib.util
_spec = importlib.util.spec_from_file_location("text_config_base", {os.path.join(ROOT, "configs", "text.py")!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  c = _base.get_config()
  c.model.update(depth=1, width=32, heads=2, mlp_dim=64)
  c.data.seq_len = 16
  c.train.update(steps=4, warmup_steps=1, batch_size=8, log_every=2, checkpoint_every=4)
  c.distill.update(steps=3, warmup_steps=1, batch_size=8, log_every=1, checkpoint_every=3, evaluate_at_end=False)
  c.evaluate.update(num_samples=8, batch_size=8, teacher_steps=(1, 4))
  c.evaluate.reference_lm.update(steps=3, width=32, depth=1, heads=2, mlp_dim=64, batch_size=8)
  return c
'''


@pytest.fixture(name="tiny_config")
def fixture_tiny_config(tmp_path):
  path = tmp_path / "tiny_text.py"
  path.write_text(TINY_CONFIG)
  return str(path)


def _cli(argv):
  """Parses ``argv`` with the command line's flags (fresh values per call) and runs the mode."""
  full = ["dimo_jax.main", *argv]
  fv = flags.FlagValues()
  config, workdir = cli.define_flags(fv, sys_argv=full)
  fv(full)
  return cli.run(config.value, workdir.value)


def test_teacher_distill_evaluate_sample(tmp_path, tiny_config):
  workdir = str(tmp_path / "run")
  # mode=distill on an empty workdir trains <workdir>/teacher first, distils it, then writes the table.
  result = _cli([f"--config={tiny_config}", f"--workdir={workdir}", "--config.mode=distill",
                 "--config.distill.evaluate_at_end=True"])
  assert result["step"] == 3 and not result["preempted"]
  assert "Goal (gen. PPL within 1.5x" in result["table"]
  at_end = json.load(open(os.path.join(workdir, "eval", "results.json")))
  teacher = json.load(open(os.path.join(workdir, "teacher", "config.json")))
  assert teacher["finished_step"] == 4 and teacher["text_network"]["seq_len"] == 16
  generator = json.load(open(os.path.join(workdir, "generator", "config.json")))
  assert generator["family"] == "text" and generator["role"] == "generator"
  assert generator["text_network"]["vocab_size"] == 257
  # A second mode=teacher on the finished teacher trains nothing more.
  again = _cli([f"--config={tiny_config}", f"--workdir={workdir}/teacher", "--config.mode=teacher"])
  assert again["step"] == 4

  results = _cli([f"--config={tiny_config}", f"--workdir={workdir}", "--config.mode=evaluate"])
  # the same draws and the cached reference LM: mode=evaluate repeats the table written at the end
  assert [(r["name"], r["gen_ppl"], r["entropy"]) for r in results["rows"]] == \
      [(r["name"], r["gen_ppl"], r["entropy"]) for r in at_end["rows"]]
  names = [r["name"] for r in results["rows"]]
  assert names[0] == "real held-out text" and names[-1] == "Di[M]O generator 1"
  # the teacher at 1 and 4 steps and at the sequence length, for each sampler
  for sampler in ("ancestral", "confidence"):
    assert [r["steps"] for r in results["rows"] if r["sampler"] == sampler] == [1, 4, 16]
  for r in results["rows"]:
    assert r["gen_ppl"] > 1.0 and 0.0 < r["entropy"] <= np.log(16) + 1e-9
    assert 0.0 <= r["repeat_4"] <= 1.0 and 0.0 < r["distinct_1"] <= 1.0
  summ = results["summary"]
  best = min(r["gen_ppl"] for r in results["rows"] if r["model"] == "teacher")
  assert summ["teacher_best_gen_ppl"] == pytest.approx(best)
  assert summ["ratio_to_teacher_best"] == pytest.approx(summ["generator_gen_ppl"] / best)
  out = os.path.join(workdir, "eval")
  table = open(os.path.join(out, "table.md")).read()
  assert "Goal (gen. PPL within 1.5x" in table and "Di[M]O generator 1" in table
  assert json.load(open(os.path.join(out, "results.json")))["family"] == "text"
  assert open(os.path.join(out, "gen_ppl.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  samples = open(os.path.join(out, "samples.txt"), encoding="utf-8").read()
  assert "=== real held-out text ===" in samples and "=== Di[M]O generator 1 ===" in samples

  written = _cli([f"--config={tiny_config}", f"--workdir={workdir}", "--config.mode=sample",
                  "--config.sample.model=generator", "--config.sample.num=3"])
  tokens = np.load(written["tokens"])
  assert tokens.shape == (3, 16) and tokens.min() >= 0 and tokens.max() < 257
  text = open(written["text"], encoding="utf-8").read()
  assert text.count("=== sample ") == 3

  # config.sample.generator_steps=2: mode=evaluate adds the generator's 2-step row (the same one-step
  # row as before, the teacher's rows from the cache) and mode=sample draws at 2 steps
  two = _cli([f"--config={tiny_config}", f"--workdir={workdir}", "--config.mode=evaluate",
              "--config.sample.generator_steps=2"])
  assert [r["name"] for r in two["rows"]] == names + ["Di[M]O generator 2"]
  assert two["rows"][-2]["gen_ppl"] == results["rows"][-1]["gen_ppl"]
  assert [g["steps"] for g in two["summary"]["generators"]] == [1, 2] and two["summary"]["generator_steps"] == 2
  assert "1.2x at more steps" in two["table"] and "2 steps " in two["table"]
  written2 = _cli([f"--config={tiny_config}", f"--workdir={workdir}", "--config.mode=sample",
                   "--config.sample.model=generator", "--config.sample.num=3", "--config.sample.generator_steps=2"])
  two_step = np.load(written2["tokens"])
  assert two_step.shape == (3, 16) and two_step.max() < 257 and not np.array_equal(two_step, tokens)


def _run_cli(args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dimo_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("case", ["empty", "binary", "too_short"])
def test_bad_text_input_exits_2_naming_the_file_and_fix(tmp_path, tiny_config, case):
  path = tmp_path / "corpus.txt"
  if case == "empty":
    path.write_bytes(b"")
    expect = ["the file is empty", "give it text"]
  elif case == "binary":
    path.write_bytes(b"\x00\x01\x02binary\x00" * 8)
    expect = ["binary file", "UTF-8"]
  else:
    path.write_text("A short document.\n\nAnother one.\n")
    expect = ["fewer than config.data.seq_len=16", "--config.data.seq_len"]
  proc = _run_cli([f"--config={tiny_config}", f"--workdir={tmp_path / 'run'}", "--config.mode=teacher",
                   "--config.data.name=text", f"--config.data.path={path}"], ROOT)
  assert proc.returncode == 2, proc.stderr[-2000:]
  err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1, proc.stderr[-2000:]
  assert str(path) in err[0], err[0]
  for part in expect:
    assert part in err[0], err[0]
