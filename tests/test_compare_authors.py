"""experiments/compare_authors.py: its own parts at a tiny size, and its errors for --authors_repo.

The side-by-side with the authors' code runs only where ``DIMO_AUTHORS_REPO`` names a checkout of
github.com/yuanzhi-zhu/DiMO (and PyTorch is installed); nothing here needs it otherwise.
"""
import math
import os
import subprocess
import sys

import pytest

from conftest import load_script

ca = load_script("compare_authors.py")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_AUTHORS = os.environ.get("DIMO_AUTHORS_REPO", "")


def _fast():
  return ca.RunOptions(steps=1, warmup=1, sample_reps=1, sides="jax", inprocess=True, fast_compile=True)


def _tiny_spec():
  return ca.Spec(**{**ca.SIZES["tiny"], "sample_steps": 2})


@pytest.fixture
def clean_authors_import():
  """Forgets any ``MaskGit_src`` module and ``sys.path`` entry a test imported."""
  path = list(sys.path)
  yield
  sys.path[:] = path
  for name in [n for n in sys.modules if n == "MaskGit_src" or n.startswith("MaskGit_src.")]:
    del sys.modules[name]


def test_missing_or_wrong_authors_repo_is_a_clear_error(tmp_path):
  with pytest.raises(ca.AuthorsRepoError, match="no --authors_repo given.*git clone https://github.com/yuanzhi-zhu/DiMO"):
    ca.check_authors_repo("")
  with pytest.raises(ca.AuthorsRepoError, match="no such directory"):
    ca.check_authors_repo(str(tmp_path / "absent"))
  with pytest.raises(ca.AuthorsRepoError, match=r"not a checkout .*MaskGit_src/Network/transformer.py is missing"):
    ca.check_authors_repo(str(tmp_path))
  # run() checks before anything long starts
  with pytest.raises(ca.AuthorsRepoError, match="no such directory"):
    ca.run(ca.Spec(**ca.SIZES["tiny"]), ca.RunOptions(authors_repo=str(tmp_path / "absent")))


def test_command_line_exits_2_with_the_message(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(_ROOT, "experiments", "compare_authors.py"),
                         f"--authors_repo={tmp_path}", "--size=tiny"],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr
  assert "is not a checkout of the Di[M]O authors' repository" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_checkout_without_their_class_is_refused(tmp_path, clean_authors_import):
  pytest.importorskip("torch")
  model_file = tmp_path / "MaskGit_src" / "Network" / "transformer.py"
  model_file.parent.mkdir(parents=True)
  model_file.write_text("class SomethingElse:\n  pass\n")
  with pytest.raises(ca.AuthorsRepoError, match="defines no MaskTransformer"):
    ca.load_authors_model_class(str(tmp_path))


def test_sizes_and_flags():
  full = ca.Spec(**ca.SIZES["full"])
  assert (full.depth, full.width, full.heads, full.mlp_dim, full.seq_len, full.codebook, full.classes,
          full.batch, full.dtype) == (24, 768, 16, 3072, 256, 1024, 1000, 64, "bfloat16")
  reduced = ca.Spec(**ca.SIZES["reduced"])
  assert (reduced.depth, reduced.width, reduced.heads, reduced.seq_len, reduced.batch, reduced.dtype) == (
      4, 256, 8, 256, 8, "float32")
  assert (reduced.guidance, reduced.dropout) == (2.0, 0.1)
  args = ca.parser().parse_args(["--size=full", "--batch=4", "--dtype=float32", "--guidance=3"])
  spec = ca.spec_from_args(args)
  assert (spec.depth, spec.batch, spec.dtype, spec.guidance) == (24, 4, "float32", 3.0)
  with pytest.raises(ValueError, match="not divisible"):
    ca.Spec(width=30, heads=4).validate()
  with pytest.raises(ValueError, match="--dtype"):
    ca.Spec(dtype="float16").validate()
  with pytest.raises(ValueError, match="--sides"):
    ca.RunOptions(sides="authors,pytorch").validate()


def test_project_config_carries_the_spec():
  spec = ca.Spec(**ca.SIZES["full"])
  c = ca.project_config(spec)
  assert (c.model.depth, c.model.width, c.model.heads, c.model.mlp_dim) == (24, 768, 16, 3072)
  assert (c.model.dtype, c.model.param_dtype, c.model.remat, c.model.dropout) == ("bfloat16", "float32", "full", 0.1)
  assert (c.data.seq_len, c.data.vocab_size, c.data.num_classes, c.distill.batch_size) == (256, 1024, 1000, 64)
  assert (c.teacher.guidance, c.distill.aux_updates, c.distill.divergence) == (2.0, 1, "fkl")
  assert tuple(c.distill.freeze) == ("tok_emb", "pos_emb", "out_bias")
  assert c.distill.teacher_dropout and c.distill.gen_dropout and c.distill.aux_dropout
  assert (c.sample.steps, c.sample.guidance, c.sample.guidance_schedule) == (16, 2.5, "linear")


@pytest.fixture(scope="module")
def jax_side():
  spec = _tiny_spec()
  return spec, ca.run_jax_side(spec, _fast())


def test_jax_side_at_tiny_size(jax_side):
  spec, r = jax_side
  assert r["side"] == "jax" and r["step"]["metrics_finite"] is True
  assert r["step"]["steps"] == 1 and r["step"]["median_s"] > 0 and r["step"]["compile_s"] > 0
  assert r["step"]["remat"] == "none"
  assert r["params"]["total"] == 13_884  # the authors' MaskTransformer at this size has as many
  assert r["memory"]["xla_compiled_step"]["estimated_bytes"] > 0
  for name in ("generator_1_step", f"teacher_{spec.sample_steps}_steps"):
    assert r["sampling"][name]["median_s"] > 0


def test_summary_and_table_without_the_authors_side(jax_side):
  spec, r = jax_side
  opts = _fast()
  record = {"command": "pytest", "date": "2026-11-27", "cpu_count": 2, "authors_repo": None,
            "authors_commit": None, "spec": ca.dataclasses.asdict(spec),
            "options": ca.dataclasses.asdict(opts), "summary": ca.summarise({"jax": [r]}, spec)}
  s = record["summary"]
  assert s["ratios_authors_over_jax"] == {} and s["jax"]["step_median_s"] == r["step"]["median_s"]
  table = ca.markdown(record)
  assert "| Di[M]O step, batch 2, median (s) | n/a |" in table
  assert "13,884" in table


def test_ratios_are_authors_over_jax():
  def side(step, peak, one, many, device="cpu"):
    return {"device": device, "device_name": "cpu: x", "framework": "f", "params": {"total": 1},
            "step": {"median_s": step, "min_s": step, "metrics_finite": True},
            "memory": {"peak_rss_timed_steps_bytes": peak, "rss_before_models_bytes": 1},
            "sampling": {"generator_1_step": {"median_s": one}, "teacher_16_steps": {"median_s": many}},
            "host_load_average": {"start": [1.0], "end": [1.0]}}
  spec = ca.Spec()
  s = ca.summarise({"authors": [side(3.0, 4e9, 0.2, 8.0), side(5.0, 4e9, 0.2, 8.0)],
                    "jax": [side(2.0, 1e9, 0.1, 2.0), side(2.0, 1e9, 0.1, 2.0)]}, spec)
  assert s["authors"]["step_median_s"] == 4.0 and s["authors"]["step_medians_per_round_s"] == [3.0, 5.0]
  r = s["ratios_authors_over_jax"]
  assert math.isclose(r["step_median_s"], 2.0) and math.isclose(r["peak_bytes"], 4.0)
  assert math.isclose(r["one_step_s"], 2.0) and math.isclose(r["teacher_steps_s"], 4.0)


@pytest.mark.skipif(not _AUTHORS, reason="set DIMO_AUTHORS_REPO to a checkout of github.com/yuanzhi-zhu/DiMO")
def test_side_by_side_with_the_authors_checkout(tmp_path, clean_authors_import):
  pytest.importorskip("torch")
  spec = _tiny_spec()
  opts = ca.RunOptions(authors_repo=_AUTHORS, steps=1, warmup=1, sample_reps=1, inprocess=True,
                       torch_threads=1, fast_compile=True, out=str(tmp_path))
  record = ca.run(spec, opts)
  a, j = record["rounds"]["authors"][0], record["rounds"]["jax"][0]
  assert j["params"]["total"] == a["params"]["total"]
  assert record["summary"]["ratios_authors_over_jax"]["step_median_s"] > 0
  assert a["step"]["metrics_finite"] and a["step"]["median_s"] > 0
  assert a["params"]["total"] == 13_884  # the same network as dimo_jax's at this size
  assert a["params"]["trainable"] < a["params"]["total"]  # embeddings, positions, output bias frozen
  assert a["memory"]["peak_rss_timed_steps_bytes"] is None or a["memory"]["peak_rss_timed_steps_bytes"] > 0
  assert (tmp_path / "compare_authors.md").exists() and (tmp_path / "compare_authors.json").exists()


def test_wait_for_load_returns_at_once_without_a_threshold():
  w = ca.wait_for_load(0.0, 0.0)
  assert w["waited_s"] < 1 and w["below_max"] is True
  w = ca.wait_for_load(1e9, 0.0)  # any load is below it
  assert w["below_max"] is True and w["waited_s"] < 1
