"""Di[M]O on Google's JAX MaskGIT (post-LN BERT, class token first, no null class, ImageNet 256).

  python -m dimo_jax.convert google-maskgit --input=maskgit_imagenet256_checkpoint --output=pretrained/maskgit_google
  python -m dimo_jax.convert google-vqgan --input=tokenizer_imagenet256_checkpoint --output=pretrained/vqgan_google
  python -m dimo_jax.main --config=configs/maskgit_google.py --workdir=/tmp/dimo_maskgit_google

Vocabulary 2025 rows: codes 0..1023, classes 1024..2023, mask 2024. Without a null class there is
no classifier-free guidance (guidance 1). The teacher was trained with cosine masking and samples
with a cosine schedule; both are used here. Other settings as in ``configs/maskgit.py``.
"""
import ml_collections

from configs import maskgit


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = maskgit.get_config(arg)

  c.model.arch = "bert"
  c.model.class_token = "first"
  c.model.gelu_approximate = True  # tanh GELU (jax.nn.gelu default)
  c.model.ln_eps = 1e-12
  c.model.ln_eps_io = 1e-12

  c.teacher.checkpoint = "pretrained/maskgit_google"
  c.teacher.source = "maskgit_imagenet256_checkpoint"
  c.teacher.guidance = 1.0  # no null class
  c.teacher.guidance_schedule = "constant"

  c.vqgan.kind = "google"
  c.vqgan.checkpoint = "pretrained/vqgan_google"
  c.vqgan.source = "tokenizer_imagenet256_checkpoint"

  c.distill.mask_schedule = "cosine"

  c.sample.schedule = "cosine"
  c.sample.guidance = 1.0
  c.sample.guidance_schedule = "constant"
  c.sample.temperature = 1.0
  c.sample.r_temp = 4.5
  return c
