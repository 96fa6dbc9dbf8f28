"""Di[M]O on the paper's teacher: valeoai MaskGIT, class-conditional ImageNet 256 (16 x 16 tokens).

The distillation is data-free: it needs the converted teacher and, to write images, the VQGAN.

  python -m dimo_jax.convert valeoai --input=MaskGIT_ImageNet_256.pth --output=pretrained/maskgit_teacher --heads=16
  python -m dimo_jax.convert taming-vqgan --input=VQGAN/last.ckpt --output=pretrained/vqgan_taming
  python -m dimo_jax.main --config=configs/maskgit.py --workdir=/tmp/dimo_maskgit

The global batch is 64 per device times the device count (``jax.device_count()``, or the number
given after the file name: ``--config=configs/maskgit.py:8``); ``--config.distill.batch_size=N``
sets it directly. Reduced runs: ``--config.model.depth=2 --config.model.width=64`` (mlp_dim
follows the width as 4 x width unless set).
"""
import ml_collections

from configs import digits

PER_DEVICE_BATCH = 64


def device_count(arg: str = "") -> int:
  """Devices the global batch is spread over: ``arg`` if given, else ``jax.device_count()``."""
  if arg:
    try:
      n = int(arg)
    except ValueError as e:
      raise ValueError(f"config argument {arg!r} must be the device count (an integer), e.g. "
                       "--config=configs/maskgit.py:8") from e
    if n < 1:
      raise ValueError(f"config argument: device count must be >= 1, got {n}")
    return n
  import jax  # pylint: disable=import-outside-toplevel
  from dimo_jax.core import sharding  # pylint: disable=import-outside-toplevel
  # Counting devices starts JAX's backend, after which a multi-process run can no longer join
  # its peers: join them first (the run's own start then finds the runtime up).
  sharding.maybe_initialize_distributed()
  return jax.device_count()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = digits.get_config()
  c.seed = 3407
  devices = device_count(arg)

  # ---------------------------------------------------------------- data (sizes only: data-free)
  c.data.name = "none"
  c.data.vocab_size = 1024  # codebook size K; mask id = K
  c.data.num_classes = 1000  # null class id = C (embedding row 2025)
  c.data.seq_len = 256
  c.data.image_shape = (16, 16)

  # ---------------------------------------------------------------- model (24 x 768, 16 heads)
  c.model.arch = "preln"
  c.model.width = 768
  c.model.depth = 24
  c.model.heads = 16
  c.model.mlp_dim = c.model.get_ref("width") * 4  # 3072
  c.model.dropout = 0.1
  c.model.class_token = "last"
  c.model.gelu_approximate = False  # exact erf GELU
  c.model.ln_eps = 1e-5
  c.model.ln_eps_io = 1e-12
  c.model.dtype = "bfloat16"  # compute; parameters stay float32
  c.model.param_dtype = "float32"
  c.model.logits_dtype = "float32"
  c.model.scan = True
  # Without rematerialisation the step keeps every layer's activations for two backward passes:
  # at batch 64 XLA asked for 74 GB of temporaries on an 80 GB H100 and the step ran out of
  # memory there. "full" keeps only each layer's input (XLA's estimate of the whole step on the
  # CPU: 97 GB without, 16 GB with; docs/performance.md, experiments/step_memory.py).
  # none | full | dots | dots_no_batch
  c.model.remat = "full"

  # ---------------------------------------------------------------- teacher
  c.teacher.checkpoint = "pretrained/maskgit_teacher"  # written by `python -m dimo_jax.convert valeoai`
  c.teacher.source = "MaskGIT_ImageNet_256.pth"  # the published file the converter reads
  c.teacher.use_ema = True
  c.teacher.guidance = 2.0
  c.teacher.guidance_schedule = "constant"

  # ---------------------------------------------------------------- VQGAN (decoding tokens to images)
  c.vqgan = ml_collections.ConfigDict()
  c.vqgan.kind = "taming"  # taming | google
  c.vqgan.checkpoint = "pretrained/vqgan_taming"  # written by `python -m dimo_jax.convert taming-vqgan`
  c.vqgan.source = "VQGAN/last.ckpt"

  # ---------------------------------------------------------------- Di[M]O (the authors' settings)
  c.distill.steps = 30_000  # the paper evaluates the EMA at 30k steps
  c.distill.batch_size = PER_DEVICE_BATCH * devices  # global: PER_DEVICE_BATCH per device
  c.distill.r_init = "fix_0.6"
  c.distill.generator_steps = 1  # the paper's one-step generator; k > 1 was not measured on ImageNet
  c.distill.generator_schedule = "linear"
  c.distill.sigma = 0.1
  c.distill.sigma_warmup_steps = 0
  c.distill.gen_temp = 1.0
  c.distill.mask_schedule = "arccos"
  c.distill.divergence = "fkl"
  c.distill.beta = 0.0
  c.distill.normalization = "batch"
  c.distill.dmd_weight = False
  c.distill.grad_input = "init"
  c.distill.gen_lr = 1e-5
  c.distill.gen_lr_schedule = "constant"  # constant (authors) | cosine (to 0 at distill.steps)
  c.distill.aux_lr = 1e-5
  c.distill.warmup_steps = 100
  c.distill.b1 = 0.9
  c.distill.b2 = 0.999
  c.distill.eps = 1e-6
  c.distill.gen_grad_clip = 1.0
  c.distill.aux_grad_clip = 0.0
  c.distill.freeze = ("tok_emb", "pos_emb", "out_bias")
  c.distill.aux_updates = 1
  c.distill.aux_label_smoothing = 0.1
  c.distill.aux_soft_target = False
  c.distill.teacher_dropout = True  # the authors never put the teacher in eval mode
  c.distill.gen_dropout = True
  c.distill.aux_dropout = True
  c.distill.ema_decay = 0.9999
  c.distill.log_every = 100
  c.distill.checkpoint_every = 1000
  c.distill.sample_every = 5000

  # ---------------------------------------------------------------- sampling (paper Table 1)
  c.sample.model = "teacher"  # teacher | generator
  c.sample.sampler = "confidence"
  c.sample.steps = 16
  c.sample.schedule = "arccos"
  c.sample.guidance = 2.5
  c.sample.guidance_schedule = "linear"
  c.sample.temperature = 1.3
  c.sample.r_temp = 4.5
  c.sample.r_init = 0.6
  c.sample.sigma = 0.1
  c.sample.num = 50_000  # 50 per class
  c.sample.batch_size = PER_DEVICE_BATCH * devices

  # ---------------------------------------------------------------- evaluation (paper Table 1)
  c.distill.evaluate_at_end = False  # 50k samples: run --config.mode=evaluate separately
  c.evaluate.teacher_steps = (2, 4, 8, 16)
  c.evaluate.teacher_samplers = ()  # the configured sampler only (MaskGIT's confidence sampler)
  c.evaluate.generator_temperatures = (1.0, 3.0, 7.0)  # FID is best near 7, IS at low temperature
  c.evaluate.per_class = 50
  c.evaluate.batch_size = PER_DEVICE_BATCH * devices
  c.evaluate.inception_path = "pretrained/pt_inception-2015-12-05-6726825d.pth"
  c.evaluate.reference_stats = "pretrained/fid_stats_imagenet256_guided_diffusion.npz"
  c.evaluate.fid_protocol = "paper"  # Table 1's protocol (docs/fid_protocol.md)
  c.evaluate.entropy_threshold = 1e-3
  c.evaluate.grid_columns = 8
  return c
