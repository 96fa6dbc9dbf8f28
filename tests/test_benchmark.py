"""Smoke test of experiments/benchmark.py on the CPU (no timing assertions) and its pure parts."""
import json
import math
import os

import jax
import pytest
from conftest import load_script

from configs import maskgit as maskgit_config
from dimo_jax.method import dimo
from dimo_jax.networks import maskgit

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


bm = load_script("benchmark.py")
mask_bm = load_script("mask_benchmark.py")


def test_mask_benchmark_runs_and_reports_both_methods():
  rows = mask_bm.main(["--shapes=4x16,2x7", "--calls=1", "--repeats=1"])
  assert [(r["batch"], r["length"]) for r in rows] == [(4, 16), (2, 7)]
  assert all(r[m] > 0 for r in rows for m in mask_bm.METHODS)
  assert "| 4 x 16 |" in mask_bm.markdown(rows)
  with pytest.raises(ValueError, match="'4by16' is not BATCHxLENGTH"):
    mask_bm.parse_shapes("4by16")


def tiny_config():
  c = maskgit_config.get_config("1")
  c.model.width = 32
  c.model.depth = 1
  c.model.heads = 2
  c.model.mlp_dim = 64
  c.model.dtype = "float32"
  c.data.seq_len = 16
  c.data.vocab_size = 16
  c.data.num_classes = 10
  c.distill.teacher_dropout = c.distill.gen_dropout = c.distill.aux_dropout = False  # smaller program
  return c


def _positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bench"))
  opts = bm.BenchmarkOptions(out=out, steps=2, warmup=1, batch=4, sample_batch=4, sample_reps=2,
                             peak_tflops=0.001, fast_compile=True, command="pytest smoke")
  record = bm.run_benchmark(tiny_config(), opts)
  return out, record


def test_smoke_writes_json_and_markdown_with_every_field(smoke):
  out, record = smoke
  with open(os.path.join(out, "benchmark.json")) as f:
    loaded = json.load(f)
  assert loaded == record
  for key in ("command", "date", "jax_version", "backend", "device_kind", "device_count", "model",
              "params", "step", "memory", "flops", "sampling", "reference", "goals",
              "comparable_to_reference", "host_load_average"):
    assert key in loaded, key
  assert loaded["device_count"] == jax.device_count() >= 1
  assert loaded["jax_version"] == jax.__version__
  assert loaded["comparable_to_reference"] is False
  assert loaded["model"]["width"] == 32 and loaded["model"]["seq_len"] == 16
  assert loaded["options"]["fast_compile"] is True

  step = loaded["step"]
  assert step["batch"] == 4 and step["steps"] == 2 and len(step["times_s"]) == 2
  for key in ("median_s", "min_s", "mean_s", "samples_per_s", "lower_s", "compile_s"):
    assert _positive(step[key]), (key, step[key])
  assert step["min_s"] <= step["median_s"]
  assert step["metrics_finite"] is True
  assert step["forward_equivalents"] == 10  # guidance 2: two teacher branches, one aux update

  mem = loaded["memory"]
  assert mem["peak_device_bytes_after_step"] is None or _positive(mem["peak_device_bytes_after_step"])
  assert _positive(mem["host_peak_rss_bytes"])
  if mem["compiled_step"] is not None:
    est = mem["compiled_step"]["estimated_bytes"]
    assert _positive(est) and est >= mem["compiled_step"]["temp_size_in_bytes"]

  fl = loaded["flops"]
  tokens = 17
  expected = 10 * 4 * (2.0 * fl["matmul_params"] * tokens + 4.0 * 1 * tokens**2 * 32)
  assert fl["analytic_per_step"] == pytest.approx(expected, rel=1e-12)
  for key in ("analytic_per_step", "peak_flops_per_device", "achieved_flops_analytic", "mfu_analytic"):
    assert _positive(fl[key]), (key, fl[key])
  assert fl["peak_flops_per_device"] == pytest.approx(1e9)
  assert fl["mfu_analytic"] == pytest.approx(
      fl["analytic_per_step"] / step["median_s"] / (1e9 * loaded["device_count"]), rel=1e-9)
  for key in ("counted_compiled_per_step", "counted_unrolled_per_step"):
    assert fl[key] is None or _positive(fl[key])

  sp = loaded["sampling"]
  assert sp["batch"] == 4 and sp["teacher_steps"] == 16 and sp["guidance"] == 2.5
  for name in ("teacher", "generator", "vqgan_decode", "teacher_vqgan", "generator_vqgan"):
    assert _positive(sp[name]["median_s"]) and _positive(sp[name]["images_per_s"]), name
    assert len(sp[name]["times_s"]) == 2
  assert sp["vqgan"]["image_size"] == 8 and sp["vqgan"]["params"] > 0  # 4 x 4 tokens, f2

  with open(os.path.join(out, "benchmark.md")) as f:
    md = f.read()
  assert "| quantity | this run | reference (H200) | goal |" in md
  assert "pytest smoke" in md and jax.__version__ in md and loaded["device_kind"] in md
  assert "distillation step, median (s)" in md and "generator + VQGAN" in md


def test_forward_equivalents_count():
  cfg = maskgit_config.get_config("1")
  settings = dimo.DistillSettings.from_config(cfg)
  assert bm.forward_equivalents(settings) == 10  # 1 gen + 2 teacher + 1 aux + 2 vjp; 1 + 1 + 2 aux
  cfg.teacher.guidance = 1.0
  assert bm.forward_equivalents(dimo.DistillSettings.from_config(cfg)) == 9
  cfg.distill.aux_updates = 3
  assert bm.forward_equivalents(dimo.DistillSettings.from_config(cfg)) == 17
  cfg.distill.grad_input = "sample"
  assert bm.forward_equivalents(dimo.DistillSettings.from_config(cfg)) == 18


def test_matmul_params_known_answer():
  k, c, w, depth, mlp, seq = 16, 10, 32, 2, 64, 16
  model = maskgit.MaskTransformer(codebook_size=k, seq_len=seq, num_classes=c, width=w, depth=depth,
                                 heads=2, mlp_dim=mlp)
  params = jax.eval_shape(lambda: maskgit.init_params(model, jax.random.key(0)))
  rows = k + c + 2
  expected = rows * w + 2 * w * w + depth * (3 * w * w + w * w + 2 * w * mlp) + w * w
  assert bm.matmul_params(params) == expected
  assert bm.matmul_params(params) < maskgit.count_params(params)


def test_full_maskgit_analytic_flops_match_reference_estimate():
  """About 60 TFLOP per step at batch 64 (reference notes, section 4), without allocating."""
  cfg = maskgit_config.get_config("1")
  model = maskgit.build_model(cfg.model, codebook_size=1024, seq_len=256, num_classes=1000)
  params = jax.eval_shape(lambda: maskgit.init_params(model, jax.random.key(0)))
  assert 170e6 < maskgit.count_params(params) < 180e6
  fl = bm.analytic_flops(model, params, dimo.DistillSettings.from_config(cfg), 64)
  assert 55e12 < fl["per_step"] < 65e12


def test_vqgan_config_sizes():
  assert bm.vqgan_config("auto", 256, 1024) == bm.vqgan.TamingConfig()
  small = bm.vqgan_config("auto", 16, 16)
  assert small.latent_size == 4 and small.n_embed == 16
  assert bm.vqgan_config("small", 256, 1024).latent_size == 16
  with pytest.raises(ValueError, match="square"):
    bm.vqgan_config("auto", 15, 16)
  with pytest.raises(ValueError, match="--vqgan=full"):
    bm.vqgan_config("full", 16, 16)


def test_bad_options_fail_clearly():
  with pytest.raises(ValueError, match="--steps"):
    bm.run_benchmark(tiny_config(), bm.BenchmarkOptions(steps=0))
  with pytest.raises(ValueError, match="--attention"):
    bm.run_benchmark(tiny_config(), bm.BenchmarkOptions(attention="flash"))
  with pytest.raises(ValueError, match="--remat"):
    bm.BenchmarkOptions(remat="some").validate()
  with pytest.raises(ValueError, match="--peak_tflops"):
    bm.BenchmarkOptions(peak_tflops=-1.0).validate()
  cfg = tiny_config()
  cfg.data.vocab_size = 0
  with pytest.raises(ValueError, match="config.data.vocab_size"):
    bm.run_benchmark(cfg, bm.BenchmarkOptions())
  if jax.devices()[0].platform != "gpu":
    with pytest.raises(ValueError, match="cudnn"):
      bm.run_benchmark(tiny_config(), bm.BenchmarkOptions(attention="cudnn"))


def test_peak_flops_lookup():
  flops, source = bm.peak_flops_per_device(bm.BenchmarkOptions(peak_tflops=790.0))
  assert flops == pytest.approx(790e12) and source == "--peak_tflops"
  table = dict(bm.PEAK_TFLOPS_BF16)
  assert table["h200"] == 989.0 and table["tpu v4"] == 275.0 and table["tpu v5 lite"] == 197.0
  assert table["tpu v5p"] == 459.0
  if jax.devices()[0].platform == "cpu":
    assert bm.peak_flops_per_device(bm.BenchmarkOptions())[0] is None


def test_flags_parse_into_options():
  from absl import flags
  fv = flags.FlagValues()
  argv = ["benchmark.py", f"--config={os.path.join(_ROOT, 'configs', 'maskgit.py')}",
          "--config.model.depth=2", "--out=/tmp/unused", "--steps=3", "--attention=xla",
          "--remat=dots", "--nodonate", "--skip_vqgan"]
  bm.define_flags(fv, sys_argv=argv)
  fv(argv)
  opts = bm.options_from_flags(fv, argv)
  got = (opts.steps, opts.attention, opts.remat, opts.donate, opts.skip_vqgan)
  assert got == (3, "xla", "dots", False, True)
  assert opts.config_file.endswith("maskgit.py") and "--steps=3" in opts.command
  cfg = bm.prepare_config(fv.config, opts)
  assert cfg.model.depth == 2 and cfg.model.remat == "dots" and cfg.model.attention_impl == "xla"
