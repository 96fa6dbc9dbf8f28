"""The Colab demo notebook (run in smoke mode without Jupyter), the Cloud TPU launch script
(its dry run), and the sweep scripts' argument checks, summaries and a tiny digits sweep."""
import json
import os
import shlex
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script

from dimo_jax.networks import maskgit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab_demo.ipynb")
LAUNCH = os.path.join(ROOT, "experiments", "tpu", "launch.sh")
REPO_URL = "https://github.com/dimo-jax/dimo_jax"
# The shipped teacher; DIMO_TEST_TEACHER points the smoke run at another teacher folder.
TEACHER = os.environ.get("DIMO_TEST_TEACHER") or os.path.join(ROOT, "pretrained", "digits_teacher")


# ---------------------------------------------------------------------------- notebook
def load_notebook(path=NOTEBOOK) -> dict:
  with open(path) as f:
    return json.load(f)


def runnable_source(cell_source: str) -> str:
  """The cell's Python with IPython shell / magic lines (``!...``, ``%...``) replaced by ``pass``
  at the same indentation, so blocks that only held such a line stay valid."""
  out = []
  for line in cell_source.splitlines():
    stripped = line.lstrip()
    if stripped.startswith(("!", "%")):
      line = line[: len(line) - len(stripped)] + "pass  # skipped: " + stripped.split("\n")[0][:40]
    out.append(line)
  return "\n".join(out) + "\n"


def code_cells(nb: dict):
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_valid_nbformat4():
  nb = load_notebook()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  ids = set()
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code")
    assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
    if nb["nbformat_minor"] >= 5:
      assert cell["id"] not in ids
      ids.add(cell["id"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None  # committed without outputs
  cells = code_cells(nb)
  for i, src in enumerate(cells):
    compile(runnable_source(src), f"<cell {i}>", "exec")
  # The repository URL is a variable in the first code cell; the install cell uses it, guarded.
  assert f'REPO = "{REPO_URL}"' in cells[0]
  install = [c for c in cells if "pip install" in c and c.lstrip().startswith("# [install]")]
  assert len(install) == 1
  assert "find_spec(\"dimo_jax\") is None" in install[0]
  assert "!pip install -q git+{REPO}" in install[0]
  assert "import jax" not in "".join(cells[:cells.index(install[0])])  # nothing imports jax before the install
  # The MaskGIT section: the convert and distill commands, and a code cell that smoke mode never runs.
  text = "".join("".join(c["source"]) for c in nb["cells"])
  assert "python -m dimo_jax.convert valeoai --input=MaskGIT_ImageNet_256.pth " \
         "--output=pretrained/maskgit_teacher --heads=16" in text
  assert "python -m dimo_jax.main --config=configs/maskgit.py" in text
  assert "RUN_MASKGIT_NOW = RUN_MASKGIT and not SMOKE" in cells[-1]


def test_notebook_cells_are_valid_ipython():
  """With IPython's own transformer (``!`` lines -> ``get_ipython().system``) every cell compiles."""
  transformer = pytest.importorskip("IPython.core.inputtransformer2")
  tm = transformer.TransformerManager()
  for i, src in enumerate(code_cells(load_notebook())):
    compile(tm.transform_cell(src), f"<cell {i}>", "exec")


def test_runnable_source_skips_shell_lines():
  src = "x = 1\nif x:\n    !pip install foo\n%time y = 2\nz = 3"
  ns = {}
  exec(compile(runnable_source(src), "<t>", "exec"), ns)  # pylint: disable=exec-used
  assert ns["x"] == 1 and ns["z"] == 3 and "y" not in ns


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # Frechet distances of a handful of samples
def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  if not os.path.isfile(os.path.join(TEACHER, "config.json")):
    pytest.skip(f"the shipped teacher {TEACHER} is missing (no config.json); train it with "
                "`python -m dimo_jax.main --config=configs/digits.py --workdir=pretrained/digits_teacher "
                "--config.mode=teacher`")
  out = tmp_path / "out"
  monkeypatch.setenv("DIMO_SMOKE", "1")
  monkeypatch.setenv("DIMO_WORKDIR", str(out))
  monkeypatch.setenv("DIMO_TEACHER", os.path.abspath(TEACHER))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(ROOT)
  ns = {"__name__": "__main__"}
  for i, src in enumerate(code_cells(load_notebook())):
    exec(compile(runnable_source(src), f"colab_demo.ipynb cell {i}", "exec"), ns)  # pylint: disable=exec-used

  assert ns["SMOKE"] is True and ns["DISTILL_STEPS"] <= 5
  k, seq_len = ns["K"], ns["L"]
  gen = ns["gen_samples"]
  assert gen.shape == (ns["NUM_SHOW"], seq_len) and gen.dtype == np.int32
  assert gen.min() >= 0 and gen.max() < k  # codes only, never the mask id
  assert list(ns["samples"]) == ["Teacher, 1 step", "Teacher, 4 steps", "Teacher, 16 steps",
                                 "Di[M]O generator, 1 step"]
  for tokens in ns["samples"].values():
    assert tokens.shape == gen.shape and tokens.max() < k
  assert all(ms > 0 for ms in ns["ms_per_sample"].values())
  # Distillation ran the requested steps and wrote a generator that the library reads back.
  assert ns["distill_log"][-1]["step"] == ns["DISTILL_STEPS"]
  assert int(ns["state"].step) == ns["DISTILL_STEPS"]
  from dimo_jax.storage import loaders
  g_model, _, _ = loaders.load_generator(str(out))
  assert (g_model.seq_len, g_model.codebook_size) == (seq_len, k)
  # Outputs: the figure and the metrics table with one row per teacher step count and the generator.
  assert (out / "samples" / "comparison.png").is_file()
  assert (out / "eval" / "table.md").is_file()
  rows = ns["results"]["rows"]
  assert [(r["sampler"], r["steps"]) for r in rows if r["model"] == "teacher"] == [
      (name, n) for name in ("confidence", "ancestral") for n in (1, 4, 16)]
  assert any(r["model"] == "generator" for r in rows)
  assert "| Model |" in ns["table"] and "over the teacher's best" in ns["table"]
  # The MaskGIT cell did not run.
  assert ns["RUN_MASKGIT_NOW"] is False and not (out / "maskgit").exists()


# ---------------------------------------------------------------------------- TPU launch script
def launch(*args, describe=None, cwd=ROOT, check=True):
  """Runs ``launch.sh --dry-run`` (plus ``args``); returns (argv of each printed command, result)."""
  env = dict(os.environ)
  env.pop("DIMO_DRY_RUN_DESCRIBE", None)
  if describe is not None:
    env["DIMO_DRY_RUN_DESCRIBE"] = describe
  res = subprocess.run(["bash", LAUNCH, "--dry-run", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=60)
  if check:
    assert res.returncode == 0, res.stderr
  commands = [shlex.split(line[2:]) for line in res.stdout.splitlines() if line.startswith("+ ")]
  return commands, res


def flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


BASE = ("--name=dimo-test", "--zone=us-central2-b", "--workdir=gs://my-bucket/dimo/digits",
        "--config=configs/digits.py", "--ref=v0.1")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@needs_bash
def test_launch_dry_run_creates_installs_and_runs():
  cmds, res = launch(*BASE, "--project=my-proj", "--config.distill.steps=2000", "--config.seed=7")
  assert all(c[0] == "gcloud" for c in cmds)
  kinds = [" ".join(c[1:5]) for c in cmds]
  assert kinds == ["compute tpus tpu-vm describe", "compute tpus tpu-vm create", "compute tpus tpu-vm ssh",
                   "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh"]
  describe, create, install, copy, run = cmds
  for c in cmds:
    assert flag(c, "--zone") == "us-central2-b" and flag(c, "--project") == "my-proj"
  assert describe[5] == "dimo-test" and create[5] == "dimo-test"
  assert flag(create, "--accelerator-type") == "v4-8"
  assert flag(create, "--version") == "tpu-ubuntu2204-base"
  # Install on every worker: jax[tpu] and the project at the requested ref.
  assert install[5] == "dimo-test" and flag(install, "--worker") == "all"
  remote = flag(install, "--command")
  assert "pip install" in remote and '"jax[tpu]==0.10.2"' in remote
  assert f"git+{REPO_URL}@v0.1" in remote
  assert remote.index("jax[tpu]") < remote.index(f"git+{REPO_URL}@v0.1")
  # The config file goes to every worker, then one ssh --worker=all runs the same command everywhere.
  assert copy[5] == "configs/digits.py" and copy[6] == "dimo-test:dimo_jax_run/configs/digits.py"
  assert flag(copy, "--worker") == "all"
  assert run[5] == "dimo-test" and flag(run, "--worker") == "all"
  job = shlex.split(flag(run, "--command").split("&&")[-1])
  i = job.index("-m")
  assert job[i + 1] == "dimo_jax.main" and job[i - 1].endswith("/bin/python")
  assert job[i + 2:] == ["--config=configs/digits.py", "--workdir=gs://my-bucket/dimo/digits",
                         "--config.distill.steps=2000", "--config.seed=7"]
  assert "cd " in flag(run, "--command")
  assert "resume" in res.stdout.lower()  # the dry run explains that rerunning resumes


@needs_bash
def test_launch_dry_run_reuses_a_ready_vm_and_resumes_with_the_same_command():
  first, _ = launch(*BASE)
  again, res = launch(*BASE, describe="READY")
  assert [c[4] for c in again] == ["describe", "ssh", "scp", "ssh"]  # no create
  assert "reusing" in res.stdout.lower()
  assert again[-1] == first[-1]  # the identical run command: main resumes from the latest checkpoint


@needs_bash
def test_launch_dry_run_recreates_a_preempted_vm():
  cmds, _ = launch(*BASE, "--spot", describe="PREEMPTED")
  assert [c[4] for c in cmds] == ["describe", "delete", "create", "ssh", "scp", "ssh"]
  assert "--quiet" in cmds[1]
  assert "--spot" in cmds[2]


@needs_bash
def test_launch_dry_run_options():
  cmds, _ = launch("--name=n", "--zone=europe-west4-a", "--accelerator-type=v5litepod-8", "--workdir=/tmp/w",
                   "--config=configs/maskgit.py:8", "--skip-install", "--detach", describe="READY")
  assert [c[4] for c in cmds] == ["describe", "scp", "ssh"]  # no install
  assert cmds[1][5] == "configs/maskgit.py"
  command = flag(cmds[-1], "--command")
  assert "--config=configs/maskgit.py:8" in command and "--workdir=/tmp/w" in command
  assert "nohup" in command and "dimo_jax_run/run.log" in command
  cmds, _ = launch("--name=n", "--accelerator-type=v5litepod-8", "--workdir=/tmp/w")
  assert flag(cmds[1], "--version") == "v2-alpha-tpuv5-lite"
  cmds, _ = launch("--name=n", "--accelerator-type=v6e-8", "--workdir=/tmp/w", "--version=my-image")
  assert flag(cmds[1], "--version") == "my-image"
  assert flag(cmds[2], "--command").count(f'"git+{REPO_URL}@main"') == 1  # default repo and ref
  cmds, _ = launch("--workdir=gs://b/x", "--repo=https://example.com/fork.git", "--ref=0123abc",
                   "--jax-version=0.9.9", "--python=3.12", describe="READY")
  remote = flag(cmds[1], "--command")
  assert '"git+https://example.com/fork.git@0123abc"' in remote and '"jax[tpu]==0.9.9"' in remote
  assert "--python 3.12" in remote


@needs_bash
@pytest.mark.parametrize("args, message", [
    ((), "--workdir"),
    (("--workdir=gs://b/x", "--bogus"), "unknown option"),
    (("--workdir=gs://b/x", "--config=configs/nope.py"), "configs/nope.py"),
    (("--workdir=/tmp/w", "--accelerator-type=v4-32"), "gs://"),
    (("--workdir=gs://b/x", "--accelerator-type=v4"), "accelerator"),
])
def test_launch_bad_input_fails_clearly(args, message):
  cmds, res = launch(*args, check=False)
  assert res.returncode != 0
  assert message in res.stderr
  assert not [c for c in cmds if c[4] in ("create", "ssh")]


@needs_bash
def test_launch_help():
  res = subprocess.run(["bash", LAUNCH, "--help"], capture_output=True, text=True, timeout=60)
  assert res.returncode == 0
  for word in ("--name", "--zone", "--accelerator-type", "--version", "--config", "--workdir", "--project",
               "--repo", "--ref", "--dry-run", "--config."):
    assert word in res.stdout


# ---------------------------------------------------------------------------- sweep scripts
sweep = load_script("digits_sweep.py")
markov = load_script("markov_mixture.py")


def test_sweep_arguments_parse_and_bad_ones_fail_clearly():
  a = sweep.parse_args(["--out=/tmp/x", "--seeds=0, 3", '--variants=[{"name": "r1", "r_init": "fix_1.0"}]'])
  assert a.seeds == [0, 3]
  c, r_eval = sweep.variant_config(a.variants[0])
  assert c.distill.r_init == "fix_1.0" and r_eval == 1.0
  _, r_eval = sweep.variant_config({"name": "x", "r_init": "fix_1.0", "eval_r_init": 0.5})
  assert r_eval == 0.5
  with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
    sweep.parse_args(["--out=x", '--variants=[{"name": "a", "lr": 1}]'])
  with pytest.raises(ValueError, match="each with a 'name'"):
    sweep.parse_args(["--out=x", '--variants=[{"gen_lr": 1e-3}]'])
  with pytest.raises(ValueError, match="not valid JSON"):
    sweep.parse_args(["--out=x", "--variants={"])
  with pytest.raises(ValueError, match="comma-separated integers"):
    sweep.parse_args(["--out=x", "--seeds=a"])


def test_sweep_summary_known_answer():
  runs = [{"name": "a", "seed": s, "curve": [{"step": 5, "fd": 9.0}, {"step": 10, "fd": f[0]}], "final": f,
           "within_class_l2": 3.0} for s, f in ((0, [10.0, 12.0]), (1, [14.0, 16.0]))]
  table = sweep.summarize(runs)
  assert "| a | 0 | 9.0@5 | 10.0 / 12.0 | 3.0 |" in table
  # Seed means 11 and 15: mean 13, sample std 2 sqrt(2).
  assert f"| a | 2 | 13.0 | {2 * np.sqrt(2):.1f} |" in table


def test_sweep_runs_a_tiny_variant_end_to_end():
  model = maskgit.MaskTransformer(codebook_size=17, seq_len=64, num_classes=10, width=16, depth=1, heads=2,
                                 mlp_dim=32)
  params = maskgit.init_params(model, jax.random.key(0))
  ref = np.random.default_rng(0).integers(0, 17, (40, 64)).astype(np.float64)
  labels = jnp.arange(24) % 10
  variant = {"name": "tiny", "steps": 2, "batch_size": 4, "aux_updates": 1, "warmup_steps": 1}
  run = sweep.run_variant(variant, 0, model, params, ref, labels, every=1)
  assert [p["step"] for p in run["curve"]] == [1, 2]
  assert len(run["final"]) == 2 and all(np.isfinite(run["final"])) and all(f > 0 for f in run["final"])
  assert run["eval_r_init"] == 0.6 and run["within_class_l2"] > 0


def test_within_class_l2_known_answer():
  x = np.array([[0, 0], [3, 4], [1, 1], [1, 1], [5, 5]])
  labels = np.array([0, 0, 1, 1, 2])  # class 0: one pair 5 apart; class 1: identical; class 2: alone
  assert sweep.within_class_l2(x, labels) == pytest.approx(2.5)


def test_markov_arguments_accept_any_distill_key_and_fail_clearly():
  a = markov.parse_args(["--out=x", '--variants=[{"name": "q", "mask_schedule": "square"}]',
                         "--eval_temperatures=1,0.8"])
  assert a.variants[0]["mask_schedule"] == "square" and a.eval_temperatures == [1.0, 0.8]
  with pytest.raises(ValueError, match=r"unknown keys \['mask_schedul'\]"):
    markov.parse_args(["--out=x", '--variants=[{"mask_schedul": "square"}]'])
  with pytest.raises(ValueError, match="positive numbers"):
    markov.parse_args(["--out=x", "--eval_temperatures=0"])
  with pytest.raises(ValueError, match="comma-separated numbers"):
    markov.parse_args(["--out=x", "--eval_temperatures=hot"])
