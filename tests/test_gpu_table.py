"""experiments/gpu_table.py: its command line, and a dry run of every part at a tiny size on the CPU."""
import json
import os
import subprocess
import sys

import pytest
from conftest import load_script

gt = load_script("gpu_table.py")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_arguments_parse_into_options():
  opts = gt.parse_args(["--size=tiny", "--parts=maskgit,t2i", "--batch=8", "--budget_gb=2.5", "--out=/tmp/x"])
  assert (opts.size, opts.part_list(), opts.batch, opts.budget_gb, opts.out) == ("tiny", ["maskgit", "t2i"], 8, 2.5,
                                                                                   "/tmp/x")
  assert opts.command.startswith("python experiments/gpu_table.py --size=tiny")
  default = gt.parse_args([])
  assert (default.size, default.batch, default.sample_batch, default.t2i_batch) == ("full", 64, 64, 16)
  assert default.part_list() == ["maskgit", "max_batch", "authors", "t2i"]


@pytest.mark.parametrize("argv, flag", [(["--parts=maskgit,speed"], "--parts"), (["--parts=,"], "--parts"),
                                        (["--batch=0"], "--batch"), (["--budget_gb=-1"], "--budget_gb"),
                                        (["--size=huge"], "--size"), (["--warmup=-1"], "--warmup")])
def test_bad_arguments_fail_naming_the_flag(argv, flag):
  with pytest.raises(ValueError, match=flag):
    gt.parse_args(argv)


def test_command_line_exits_2_on_a_bad_value():
  proc = subprocess.run([sys.executable, os.path.join(_ROOT, "experiments", "gpu_table.py"), "--parts=speed"],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2 and "--parts='speed'" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_dry_run_fills_every_row(tmp_path):
  opts = gt.parse_args(["--size=tiny", "--parts=maskgit,max_batch,authors,t2i", "--batch=2", "--sample_batch=2",
                        "--t2i_batch=1", "--steps=1", "--warmup=0", "--budget_gb=0.05", f"--out={tmp_path}"])
  record = gt.run(opts)
  rows = {r["row"]: r for r in record["rows"]}
  assert not [r for r in record["rows"] if r.get("note", "").startswith("failed")], record["rows"]
  step = rows["dimo_jax step (configs/maskgit.py)"]
  assert step["batch"] == 2 and step["median_s"] > 0 and step["tflop"] > 0
  assert rows["one-step sampling + VQGAN decode"]["median_s"] > 0
  big = rows["dimo_jax step, largest batch"]
  # The chosen batch is the largest tried whose estimate is within the budget, a multiple of 8 above --batch.
  search = big["search"]
  assert search["fits"] and big["batch"] == search["batch"] and big["batch"] % 8 == 0
  assert search["estimates"][big["batch"]] <= 0.05e9
  assert all(e > 0.05e9 for b, e in search["estimates"].items() if b > big["batch"])
  assert rows["authors' step (PyTorch)"]["note"].startswith("not run")
  t2i = rows["text-to-image step (configs/meissonic.py)"]
  assert t2i["batch"] == 1 and t2i["median_s"] > 0 and t2i["tflop"] > 0
  saved = json.load(open(tmp_path / "gpu_table.json"))
  assert len(saved["rows"]) == len(record["rows"])
  table = open(tmp_path / "gpu_table.md").read()
  assert "| dimo_jax step, largest batch |" in table and "| text-to-image step" in table
