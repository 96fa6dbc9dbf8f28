"""Meissonic text-to-image at 1024 px: its 48-step sampler on a file of prompts (``mode=sample``).

Convert the three networks of the Meissonic release (a local copy of the Hugging Face repository
MeissonFlow/Meissonic in ./Meissonic; safetensors only); the tokenizer is read from the release
as it is:

  python -m dimo_jax.convert meissonic --input=Meissonic/transformer --output=pretrained/meissonic/transformer
  python -m dimo_jax.convert meissonic-vq --input=Meissonic/vqvae --output=pretrained/meissonic/vqvae
  python -m dimo_jax.convert clip-text --input=Meissonic/text_encoder --output=pretrained/meissonic/text_encoder
  python -m dimo_jax.main --config=configs/meissonic.py --workdir=/tmp/meissonic \\
      --config.sample.prompts=prompts.txt

One PNG per prompt, ``index.jsonl`` (number, file, prompt, seed), ``grid.png`` and
``settings.json`` land in ``<workdir>/samples`` (``--config.sample.output=<folder>``). A missing
converted folder stops with the command that writes it.

Sampling defaults are Meissonic's pipeline and paper: 48 steps, guidance 9 against Meissonic's
standard negative prompt, Gumbel temperature ramp (2, 0), micro-conditions [1024, 1024, 0, 0, 6].
The transformer computes in bf16 with bf16 parameters (2 GB); the CLIP text tower and the VQ
decoder run in float32 (the VQ "to avoid NaN", as both upstream repositories), one image at a time.

``--config.sample.generator=<distill workdir>/generator`` (or a converted one-step transformer,
e.g. the released Yuanzhi/DiMO one) samples with the distilled generator's one step instead
(``c.sample.one_step``). ``--config.mode=evaluate`` writes the HPS v2.0 and GenEval images for
their official scorers from the same model (``c.evaluate``; README, "From the released folders to
HPS v2.0 and GenEval").
"""
import ml_collections

from configs import base

# The negative prompt of every Meissonic script and of Di[M]O (reference section 4).
NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, "
                   "signature, text, jpeg artifacts, signature, sketch, duplicate, ugly, "
                   "identifying mark")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = base.get_config("meissonic", "sample", seed=42, train=False)

  # ---------------------------------------------------------------- the networks (converted folders)
  c.meissonic = ml_collections.ConfigDict()
  c.meissonic.source = "Meissonic"  # the released folder the convert commands read
  c.meissonic.transformer = "pretrained/meissonic/transformer"  # python -m dimo_jax.convert meissonic
  c.meissonic.vqvae = "pretrained/meissonic/vqvae"  # python -m dimo_jax.convert meissonic-vq
  c.meissonic.text_encoder = "pretrained/meissonic/text_encoder"  # python -m dimo_jax.convert clip-text
  c.meissonic.tokenizer = "Meissonic/tokenizer"  # the released tokenizer/ folder, read as it is
  c.meissonic.dtype = "bfloat16"  # transformer compute
  c.meissonic.param_dtype = "bfloat16"  # transformer parameters in memory
  c.meissonic.remat = "none"  # none | full | dots | dots_no_batch (sampling needs no backward)
  c.meissonic.attention_impl = ""  # "" (XLA) | cudnn
  c.meissonic.text_dtype = "float32"  # CLIP text tower compute
  c.meissonic.vq_dtype = "float32"  # VQ decoder compute

  # ---------------------------------------------------------------- sampling (Meissonic's pipeline)
  c.sample = ml_collections.ConfigDict()
  c.sample.model = "meissonic"
  c.sample.prompts = ""  # a UTF-8 text file, one prompt per line (required)
  c.sample.negative_prompt = NEGATIVE_PROMPT
  c.sample.resolution = 1024  # pixels (64 x 64 tokens); keep micro_conds' width and height alike
  c.sample.steps = 48
  c.sample.guidance = 9.0
  c.sample.temperature = (2.0, 0.0)  # Gumbel noise on the confidence, first step -> last step
  c.sample.micro_conds = (1024.0, 1024.0, 0.0, 0.0, 6.0)  # width, height, crop top, left, score
  c.sample.batch_size = 4  # prompts per sampler call (the network sees twice as many: guidance)
  c.sample.seed = 42  # image i draws with PRNGKey(seed + i)
  c.sample.output = ""  # a folder; default <workdir>/samples
  c.sample.grid_columns = 4
  c.sample.grid_image_size = 256  # pixels per image in grid.png (0: full size)
  # One-step sampling from a distilled generator (replaces the teacher and its steps and guidance):
  # <distill workdir>/generator (its EMA parameters) or a converted one-step transformer, e.g. the
  # released Yuanzhi/DiMO meissonic/transformer after python -m dimo_jax.convert meissonic.
  c.sample.generator = ""
  c.sample.one_step = ml_collections.ConfigDict()
  # Di[M]O's training values (reference section 5.3): the x_init the generator learnt from. The
  # authors' sample_Meissonic.py defaults to r_init 0.6 / sigma 0.1 and its HPS / GenEval commands
  # pass temperature 1.2; which of them gave the paper's numbers is not stated.
  c.sample.one_step.r_init = 0.5  # share of masked positions in x_init (uniform random codes elsewhere)
  c.sample.one_step.sigma = 0.3  # Gaussian noise on the image-token embeddings
  c.sample.one_step.temperature = 1.0  # of the per-token categorical draw

  # ---------------------------------------------------------------- benchmarks (--config.mode=evaluate):
  # images for the official PyTorch scorers, drawn with config.sample's model and settings (the
  # teacher, or the generator when config.sample.generator is set). Reference section 6.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.suite = "hps,geneval"  # hps | geneval | hps,geneval
  # HPS v2: folder of anime.json, concept-art.json, paintings.json, photo.json (800 prompts each;
  # hpsv2.benchmark_prompts('all') downloads them to ~/.cache/hpsv2/datasets/benchmark).
  c.evaluate.hps_prompts = ""
  c.evaluate.hps_styles = ("anime", "concept-art", "paintings", "photo")  # one .jpg per prompt
  c.evaluate.geneval_metadata = ""  # GenEval's prompts/evaluation_metadata.jsonl (553 prompts)
  c.evaluate.geneval_samples = 4  # images per GenEval prompt, the seed reset per prompt
  c.evaluate.max_prompts = 0  # 0: all; N: the first N per style / of GenEval (smoke test only)
  c.evaluate.output = ""  # a folder; default <workdir>/t2i_eval (hps/, geneval/, settings.json)

  # ---------------------------------------------------------------- Di[M]O (mode=distill): the authors'
  # text-to-image recipe (reference section 5.1: their evaluated run, EMA at 13000 steps).
  c.teacher = ml_collections.ConfigDict()
  c.teacher.guidance = 4.0  # against the negative prompt's condition, in the same batched call
  c.teacher.guidance_schedule = "constant"
  c.distill.prompts = ""  # a UTF-8 text file, one prompt per line (the authors: aesthetics_6_plus.txt)
  c.distill.negative_prompt = NEGATIVE_PROMPT
  # Prompt conditions: '' = the CLIP tower under jax.jit on each step's prompts; a .npz path = every
  # prompt's condition computed once and cached there (a cache written for another prompt file,
  # tokenizer or text encoder stops with the difference).
  c.distill.text_cache = ""
  c.distill.steps = 13000
  c.distill.batch_size = 16  # the authors: 2 per step x 8 accumulations, one GPU
  c.distill.aux_updates = 1  # on 16 fresh prompts
  c.distill.r_init = "fix_0.5"
  c.distill.generator_steps = 1  # the authors' one-step generator; k > 1 was not measured on Meissonic
  c.distill.generator_schedule = "linear"
  c.distill.sigma = 0.3  # embedding noise on the generator's image tokens
  c.distill.sigma_warmup_steps = 0
  c.distill.gen_temp = 1.0
  c.distill.top_k = 0
  c.distill.top_p = 1.0
  c.distill.mask_schedule = "cosine_clamped"  # r = cos(pi/2 u) clamped to [0.02, 0.98], exact count
  c.distill.divergence = "fkl"  # Jeffreys with beta 0
  c.distill.beta = 0.0
  c.distill.normalization = "batch"  # sum over tokens / batch
  c.distill.dmd_weight = False
  c.distill.grad_input = "init"
  c.distill.aux_guidance = 1.0
  c.distill.gen_lr = 1e-6
  c.distill.gen_lr_schedule = "constant"
  c.distill.aux_lr = 1e-6
  c.distill.warmup_steps = 100
  c.distill.b1 = 0.9
  c.distill.b2 = 0.999
  c.distill.eps = 1e-6  # Adam (no weight decay), the authors' bf16 value
  c.distill.gen_grad_clip = 1.0
  c.distill.aux_grad_clip = 0.0
  c.distill.freeze = ("embed", "mlm_layer")  # token embedding and output head, generator and auxiliary
  c.distill.aux_label_smoothing = 0.1
  c.distill.aux_soft_target = False
  c.distill.smooth_teacher = False
  c.distill.ema_decay = 0.9999
  c.distill.compute_dtype = "bfloat16"  # the three transformers compute in bf16 ...
  c.distill.param_dtype = "float32"  # ... with float32 master weights and Adam states
  c.distill.remat = "full"  # every block rematerialised (the authors: gradient checkpointing on all three)
  c.distill.log_every = 50
  c.distill.checkpoint_every = 500

  # ---------------------------------------------------------------- devices: parameters and Adam
  # states over fsdp (teacher, generator and auxiliary with Adam take about 40 GB in float32).
  c.mesh.fsdp = -1  # -1: every device
  return c
