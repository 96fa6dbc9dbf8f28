"""What every config shares, whatever its family: ``family``, ``mode``, ``seed``, ``distributed``,
the device ``mesh`` and the loop cadence of ``distill`` (and of ``train`` for the families that
train their teacher). The family configs (``digits.py``, ``captioned_digits.py``,
``meissonic.py``) start from ``get_config`` and override; ``tokens.py`` and ``maskgit.py`` derive
from ``digits.py``.
"""
import ml_collections


def cadence(section: ml_collections.ConfigDict, *, log_every: int = 100, checkpoint_every: int = 0,
            keep_checkpoints: int = 2, sample_every: int = 0) -> ml_collections.ConfigDict:
  """The loop keys of ``config.train`` / ``config.distill`` (``checkpoint_every`` 0: at the end
  and on SIGTERM only; ``sample_every`` 0: no sample grids)."""
  section.log_every = log_every
  section.checkpoint_every = checkpoint_every
  section.keep_checkpoints = keep_checkpoints
  section.sample_every = sample_every
  return section


def get_config(family: str, mode: str, seed: int, *, train: bool = True) -> ml_collections.ConfigDict:
  """The shared keys; ``train``: whether the family trains its teacher (``config.train``)."""
  c = ml_collections.ConfigDict()
  c.family = family  # classes | captioned_digits | meissonic (dimo_jax/families/)
  c.mode = mode  # teacher | distill | sample | evaluate
  c.seed = seed
  # True: jax.distributed.initialize() with JAX's cluster detection (SLURM, Open MPI, Kubernetes);
  # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID start it without this
  # (experiments/tpu/README.md, "Multi-host and multi-node").
  c.distributed = False
  if train:
    c.train = cadence(ml_collections.ConfigDict())
  c.distill = cadence(ml_collections.ConfigDict())
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by fsdp
  c.mesh.fsdp = 1  # -1: every device
  return c
