import os
import resource
import time

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def load_script(script: str):
  """Imports ``experiments/<script>`` once as a module (the experiment scripts are not a package)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  name = "dimo_" + script[:-3] + "_script"
  if name not in sys.modules:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "experiments", script))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


def run_on_simulated_devices(script: str, devices: int = 8, timeout: int = 400):
  """Runs ``python -c script`` from the repository root in a fresh process whose CPU backend shows
  ``devices`` devices (XLA's host-platform device count is read once, at start-up, so it needs its
  own process); returns the ``subprocess.CompletedProcess``."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                        timeout=timeout)


# ---------------------------------------------------------------------------- test tiers
SLOW_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt")


def _slow_ids(path: str = SLOW_LIST) -> set:
  """The node ids (``tests/test_x.py::test_y``, parameters dropped) listed in ``slow_tests.txt``."""
  if not os.path.exists(path):
    return set()
  with open(path, encoding="utf-8") as f:
    return {line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()}


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a test of the whole suite left out of the fast tier "
                                     "(-m 'not slow'); listed in tests/slow_tests.txt")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  """With ``DIMO_TEST_CPU_LOG=<file>`` set, appends ``<cpu seconds> <wall seconds> <node id>`` per test:
  the CPU time of the test's process (every thread) plus that of the subprocesses it waited for,
  which, unlike wall time, a loaded host barely changes (``tests/mark_slow.py`` reads the file)."""
  path = os.environ.get("DIMO_TEST_CPU_LOG")
  if not path:
    yield
    return

  def children():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

  c0, t0, w0 = children(), time.process_time(), time.time()
  yield
  cpu = time.process_time() - t0 + children() - c0
  with open(path, "a", encoding="utf-8") as f:
    f.write(f"{cpu:.3f} {time.time() - w0:.3f} {item.nodeid}\n")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Marks ``slow`` every test whose id (without parameters) or file is in ``slow_tests.txt``."""
  slow = _slow_ids()
  for item in items:
    node = item.nodeid.split("[", 1)[0]
    if node in slow or node.split("::", 1)[0] in slow:
      item.add_marker(pytest.mark.slow)
