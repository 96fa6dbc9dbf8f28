"""XLA's memory estimate of a compiled program against what the device may hold."""

from __future__ import annotations

from typing import Optional

import jax

pass



def estimated_bytes(analysis) -> Optional[int]:
  """Per device, live at once at worst: arguments, outputs not aliased to them, temporaries
  (from ``compiled.memory_analysis()``); None where the backend gives no analysis."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
  if analysis is None or not all(hasattr(analysis, n) for n in names):
    return None
  args, out, alias, temp = (int(getattr(analysis, n)) for n in names)
  return args + out - alias + temp


def device_bytes_limit() -> Optional[int]:
  """The memory JAX may use on the first local device (GPU / TPU); None on the CPU."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def check_fits(compiled, bytes_limit: Optional[int]) -> Optional[int]:
  """XLA's estimate of the compiled step's bytes per device; raises when it exceeds ``bytes_limit``."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  need = estimated_bytes(analysis)
  if need is None or not bytes_limit or need <= bytes_limit:
    return need
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  raise ValueError(
      f"the distillation step needs about {need / 1e9:.1f} GB per device (XLA's estimate: state "
      f"{analysis.argument_size_in_bytes / 1e9:.1f} GB, temporaries {analysis.temp_size_in_bytes / 1e9:.1f} GB) "
      f"but JAX may use {bytes_limit / 1e9:.1f} GB of the device. Set --config.model.remat=full "
      "(keeps only each layer's input for the backward passes), lower --config.distill.batch_size, "
      "shard over more devices (config.mesh), or raise XLA_PYTHON_CLIENT_MEM_FRACTION on a GPU; "
      "experiments/step_memory.py compares the remat policies without allocating anything")
