"""Your own token sequences: an int array [N, L] in a .npy file (labels [N] optional).

Teacher:  python -m dimo_jax.main --config=configs/tokens.py --workdir=/tmp/tok_teacher \
            --config.data.path=tokens.npy [--config.data.labels=labels.npy]
Sample:   python -m dimo_jax.main --config=configs/tokens.py --workdir=/tmp/tok_teacher \
            --config.mode=sample --config.sample.num=16
Set --config.data.image_shape='(H, W)' when the tokens are grey-level images (PNG grids).
The defaults (a 64 x 2 transformer) train on a 2-core CPU.
"""
import importlib.util
import os

from ml_collections import config_dict


def _digits():
  try:
    from configs import digits  # pylint: disable=import-outside-toplevel
    return digits
  except ImportError:  # loaded by path from outside the repository root
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")
    spec = importlib.util.spec_from_file_location("dimo_configs_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
  c = _digits().get_config()
  c.mode = "teacher"

  c.data.name = "npy"
  c.data.path = ""  # required: tokens [N, L]
  c.data.labels = ""  # optional: labels [N]
  c.data.vocab_size = 0  # 0: max token + 1
  c.data.num_classes = 0  # 0: max label + 1 with labels, unconditional without
  c.data.image_shape = config_dict.placeholder(tuple)  # None, or (H, W) for grey-level images

  c.model.width = 64
  c.model.depth = 2
  c.model.heads = 4
  c.model.mlp_dim = 256
  c.model.dropout = 0.0

  c.train.steps = 2000
  c.train.batch_size = 64
  c.train.warmup_steps = 100
  c.train.ema_decay = 0.999
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.sample_every = 0  # no image grids unless image_shape is set

  c.teacher.checkpoint = ""  # distill: the teacher workdir trained above
  c.sample.num = 16
  c.sample.batch_size = 16
  c.sample.steps = 8
  return c
