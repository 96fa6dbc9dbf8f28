import os

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
