"""What a run prints (dimo_jax.console): library noise to <workdir>/log.txt, the project's lines and
warnings on the terminal, --verbose for everything; and the install files' one JAX pin."""
import io
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from dimo_jax import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_FILE = os.path.join(ROOT, "dimo_jax", "modes", "distill.py")
LIBRARY_FILE = os.path.join(sys.prefix, "lib", "site-packages", "somelib", "core.py")
NOISE = ("oneDNN", "absl::InitializeLog", "libtpu", "xla_bridge", "cpu_feature_guard", "steps_per_sec", "uptime=")


def _record(path, level=logging.INFO, msg="hello", name="absl"):
  return logging.LogRecord(name, level, path, 1, msg, (), None)


def test_quiet_environment_keeps_what_the_user_set():
  env = {"TF_CPP_MIN_LOG_LEVEL": "0"}
  added = console.quiet_environment(environ=env)
  assert env["TF_CPP_MIN_LOG_LEVEL"] == "0" and "TF_CPP_MIN_LOG_LEVEL" not in added
  assert added == {k: v for k, v in console.QUIET_ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env = {}
  assert console.quiet_environment(verbose=True, environ=env) == {} and env == {}


def test_library_filter_keeps_the_project_progress_and_warnings():
  f = console.LibraryFilter()
  clu = os.path.join(sys.prefix, "lib", "site-packages", "clu", "metric_writers", "logging_writer.py")
  assert f.filter(_record(PROJECT_FILE))
  assert f.filter(_record(LIBRARY_FILE, name="dimo_jax.something"))
  assert not f.filter(_record(LIBRARY_FILE))  # another package's INFO
  assert f.filter(_record(LIBRARY_FILE, logging.WARNING))
  assert f.filter(_record(LIBRARY_FILE, logging.ERROR))
  assert f.filter(_record(clu, msg="[10] train/loss=2.5, train/lr=0.001"))
  assert not f.filter(_record(clu, msg="[10] steps_per_sec=3.2"))
  assert not f.filter(_record(clu, msg="[10] uptime=12.5"))


def test_short_format_names_warnings_and_progress():
  fmt = console.ShortFormatter()
  assert re.fullmatch(r"\d\d:\d\d:\d\d hello", fmt.format(_record(PROJECT_FILE)))
  assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING: hello", fmt.format(_record(PROJECT_FILE, logging.WARNING)))
  line = fmt.format(_record(PROJECT_FILE, msg="Setting work unit notes: 2.0 steps/s, 50.0% (2/4), ETA: 0m"))
  assert line.endswith(" progress: 2.0 steps/s, 50.0% (2/4), ETA: 0m")


def test_setup_routes_records_and_warnings_and_undoes(tmp_path, monkeypatch):
  shown_warnings = []
  monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown_warnings.append(str(message)))
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  root = logging.getLogger()
  root.addHandler(handler)
  level = root.level
  root.setLevel(logging.INFO)
  shown_before = warnings.showwarning
  con = console.setup(str(tmp_path / "run"), handler=handler, quiet_imports=())
  try:
    assert con.log_file == str(tmp_path / "run" / "log.txt")
    root.handle(_record(PROJECT_FILE, msg="the project's line"))
    root.handle(_record(LIBRARY_FILE, msg="a library's INFO"))
    root.handle(_record(LIBRARY_FILE, logging.WARNING, msg="a library's warning"))
    with warnings.catch_warnings():
      warnings.simplefilter("always")
      warnings.warn_explicit("deprecated in somelib", FutureWarning, LIBRARY_FILE, 3)
      warnings.warn_explicit("the teacher looks untrained", UserWarning, PROJECT_FILE, 7)
  finally:
    con.close()
    root.removeHandler(handler)
    root.setLevel(level)
  shown = stream.getvalue()
  assert "the project's line" in shown and "WARNING: a library's warning" in shown
  assert "a library's INFO" not in shown
  assert shown_warnings == ["the teacher looks untrained"]
  log = open(con.log_file).read()
  for text in ("the project's line", "a library's INFO", "a library's warning", "deprecated in somelib"):
    assert text in log
  # Undone: the handler's filter and format, the warning hook, the file handler.
  assert handler.filters == [] and warnings.showwarning is shown_before
  assert not any(getattr(h, "baseFilename", "") == con.log_file for h in root.handlers)


def test_quiet_imports_send_native_start_up_lines_to_the_log(tmp_path, capfd, monkeypatch):
  (tmp_path / "noisy_native_mod.py").write_text(
      "import os\nos.write(2, b'I0000 port.cc:153] oneDNN custom operations are on\\n')\nVALUE = 3\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  log = str(tmp_path / "log.txt")
  finder = console.QuietImports(["noisy_native_mod"], log)
  sys.meta_path.insert(0, finder)
  try:
    import noisy_native_mod  # pylint: disable=import-outside-toplevel,import-error
  finally:
    sys.meta_path.remove(finder)
    sys.modules.pop("noisy_native_mod", None)
  assert noisy_native_mod.VALUE == 3
  assert "oneDNN" not in capfd.readouterr().err
  assert "oneDNN custom operations are on" in open(log).read()


def test_native_stderr_is_replayed_when_the_block_fails(tmp_path, capfd):
  log = str(tmp_path / "log.txt")
  with pytest.raises(RuntimeError):
    with console.native_stderr_to(log):
      os.write(2, b"native crash report\n")
      raise RuntimeError("boom")
  assert "native crash report" in capfd.readouterr().err


def test_log_path_only_for_local_folders(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  assert console.log_path(str(afile)) is None
  assert console.log_path("gs://bucket/run") is None and console.log_path("") is None
  assert console.log_path(str(tmp_path / "new")) == str(tmp_path / "new" / "log.txt")


def _pins(name):
  lines = [l.split("#")[0].strip() for l in open(os.path.join(ROOT, name))]
  return [l for l in lines if l]


def test_one_jax_version_for_every_accelerator():
  cpu = _pins("requirements.txt")
  version = next(l.split("==")[1] for l in cpu if l.startswith("jax=="))
  assert f"jaxlib=={version}" in cpu and any(l.startswith("matplotlib") for l in cpu)
  assert _pins("requirements-gpu.txt") == ["-r requirements.txt", f"jax[cuda12]=={version}"]
  assert _pins("requirements-tpu.txt") == ["-r requirements.txt", f"jax[tpu]=={version}"]
  setup_py = open(os.path.join(ROOT, "setup.py")).read()
  assert '"gpu": [f"jax[cuda12]=={JAX_VERSION}"]' in setup_py and '"tpu": [f"jax[tpu]=={JAX_VERSION}"]' in setup_py
  launch = open(os.path.join(ROOT, "experiments", "tpu", "launch.sh")).read()
  assert f'JAX_VERSION="{version}"' in launch


def _run_main(workdir, *extra):
  env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "DIMO_VERBOSE")}
  env.update(JAX_PLATFORMS="", PYTHONUNBUFFERED="1")
  argv = [sys.executable, "-m", "dimo_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
          "--config.mode=teacher", "--config.model.width=16", "--config.model.depth=1", "--config.model.heads=2",
          "--config.model.mlp_dim=32", "--config.train.steps=2", "--config.train.batch_size=8",
          "--config.train.eval_every=0", "--config.train.log_every=1", *extra]
  proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return proc.stdout.splitlines()


def _progress(line):
  return " progress: " in line or re.match(r"^\S+ \[\d+\] ", line) is not None


def test_main_prints_little_and_verbose_prints_everything(tmp_path):
  workdir = tmp_path / "run"
  lines = _run_main(workdir)
  rest = [l for l in lines if l.strip() and not _progress(l)]
  assert len(rest) <= 6, "\n".join(lines)
  assert rest[0].split(" ", 1)[1].startswith(f"dimo_jax teacher: --config=configs/digits.py --workdir={workdir} ")
  assert f"library log: {workdir}/log.txt" in rest[0]
  assert any("Result:" in l for l in rest) and any(" progress: " in l for l in lines)
  for noise in NOISE:
    assert not any(noise in l for l in lines), noise
  assert not any(re.match(r"^[IWE]\d{4} ", l) for l in lines)  # absl's long prefix
  log = open(workdir / "log.txt").read()
  assert "Teacher training finished" in log and "steps_per_sec" in log
  # --verbose: the libraries' lines as they print them (the finished run restores and stops).
  verbose = _run_main(workdir, "--verbose")
  assert len(verbose) > len(rest)
  assert any(re.match(r"^I\d{4} ", l) for l in verbose)
