"""Your own token sequences: an int array [N, L] in a .npy file (labels [N] optional).

Teacher:  python -m dimo_jax.main --config=configs/tokens.py --workdir=/tmp/tok_teacher \
            --config.data.path=tokens.npy [--config.data.labels=labels.npy]
Distill:  python -m dimo_jax.main --config=configs/tokens.py --workdir=/tmp/tok_dimo --config.mode=distill \
            --config.data.path=tokens.npy --config.teacher.checkpoint=/tmp/tok_teacher
Sample:   python -m dimo_jax.main --config=configs/tokens.py --workdir=/tmp/tok_teacher \
            --config.mode=sample --config.sample.num=16
Set --config.data.image_shape='(H, W)' when the tokens are grey-level images (PNG grids).
The teacher is sized to the data within --config.train.budget (default 10min on a 2-core CPU).
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

  # 0: sized to the data (N sequences, length L, V values) within train.budget
  # (dimo_jax/method/teacher_size.py; one log line says what was chosen); a value you set wins.
  c.model.width = 0
  c.model.depth = 0
  c.model.heads = 0
  c.model.mlp_dim = 0
  c.model.dropout = 0.0

  # Teacher: trained until the validation bound stops improving by more than its noise. Every
  # eval_every steps the EMA parameters' validation loss is measured with its standard error (the
  # spread of its per-batch losses); when the best of the last `plateau_window` evaluations is not
  # below the earlier best by more than `plateau_k` standard errors, or the steps the budget pays
  # for are spent, training stops and the best EMA parameters are kept (saved as the final
  # checkpoint). The samples are then checked against structure the data always holds, and the
  # report says how far the teacher is from the data and which budget to try next.
  c.train.budget = "10min"  # wall-clock minutes on a 2-core CPU ("10min") or FLOPs ("2e13")
  c.train.steps = 0  # 0: what the budget pays for
  c.train.batch_size = 128
  c.train.warmup_steps = 100
  # Uniform mask ratios with independent masking: every number of masked positions 0..L equally
  # often, as the L-step sampler asks for them (arccos draws the states with one masked position,
  # where a position fixed by all the others is decided, about 40% less often; docs/proofs.md, section 11).
  c.train.mask_schedule = "linear"
  c.train.ema_decay = 0.995
  c.train.log_every = 250
  c.train.eval_every = 250
  c.train.plateau_window = 6  # evaluations compared with the earlier best (0: the patience rule)
  c.train.plateau_k = 2.0  # standard errors of the validation loss a gain must exceed
  c.train.patience = 0  # with plateau_window 0: evaluations without a relative gain of min_delta
  c.train.min_delta = 1e-3
  c.train.structure_samples = 2000  # teacher samples checked against the data's structure (0: off)
  c.train.checkpoint_every = 500
  c.train.sample_every = 0  # no image grids unless image_shape is set

  # Di[M]O: the recipe chosen on the joint benchmark (docs/proofs.md, section 8). Forward KL
  # (Jeffreys with beta < 0 diverges against teachers with zero probabilities), nothing frozen,
  # the auxiliary four updates per step at three times the generator's lr, the generator's lr
  # decayed by a cosine, the square masking schedule (more lightly masked states).
  c.distill.divergence = "fkl"
  c.distill.beta = 0.0
  c.distill.gen_lr = 1e-3
  c.distill.gen_lr_schedule = "cosine"
  c.distill.aux_lr = 3e-3
  c.distill.aux_updates = 4
  c.distill.mask_schedule = "square"
  c.distill.batch_size = 128
  c.distill.steps = 1000
  # One generator step: measured on copy / permutation joints with this recipe, 2 steps ('linear')
  # sampled 9-13% lower TV than one step, but its one-step rows got worse (4.6x against 3.3x the
  # teacher's best) and it stayed 3x off (docs/proofs.md, section 10). Data with hard constraints
  # between positions may set --config.distill.generator_steps=2.
  c.distill.generator_steps = 1
  c.distill.generator_schedule = "linear"
  c.distill.freeze = ()
  c.distill.aux_label_smoothing = 0.0
  c.distill.sample_every = 0

  # Evaluation without labels: per-position and pairwise TV to held-out data, the teacher's
  # bound on the samples, diversity; exact sequence TV where the space is enumerable.
  c.evaluate.num_samples = 5000
  c.evaluate.teacher_steps = (1, 2, 4, 8, 16)  # counts above the sequence length are dropped
  c.evaluate.entropy_samples = 0
  c.evaluate.timing_repeats = 1

  c.teacher.checkpoint = ""  # distill: the teacher workdir trained above
  c.sample.num = 16
  c.sample.batch_size = 16
  c.sample.steps = 8
  return c
