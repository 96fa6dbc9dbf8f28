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
"""
import ml_collections

# The negative prompt of every Meissonic script and of Di[M]O (reference section 4).
NEGATIVE_PROMPT = ("worst quality, low quality, low res, blurry, distortion, watermark, logo, "
                   "signature, text, jpeg artifacts, signature, sketch, duplicate, ugly, "
                   "identifying mark")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.mode = "sample"
  c.seed = 42

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
  return c
