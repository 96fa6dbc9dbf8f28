"""Converters from published MaskGIT, Di[M]O and Meissonic checkpoints to dimo_jax checkpoints.

Sources (layouts: ``reference/dimo_reference.md`` section 3):

- ``valeoai``: the valeoai MaskGIT PyTorch teacher (``MaskGIT_ImageNet_256.pth``), the Di[M]O
  paper's teacher -> ``MaskTransformer`` (arch ``'preln'``).
- ``dimo-generator``: the Di[M]O authors' one-step generator (``pytorch_model.bin``, the same
  layout) -> a generator checkpoint.
- ``google-maskgit``: Google's JAX MaskGIT msgpack (``maskgit_imagenet256_checkpoint``) ->
  ``BertMaskTransformer`` (arch ``'bert'``).
- ``taming-vqgan`` / ``google-vqgan``: the two VQGAN tokenizers (``dimo_jax.networks.vqgan``, ``dimo_jax.networks.vqgan_google``).
- ``meissonic`` / ``meissonic-vq`` / ``clip-text``: the three networks of the Meissonic release
  (``transformer/``, ``vqvae/``, ``text_encoder/``; safetensors only) -> ``MeissonicTransformer``,
  ``MeissonicVQModel``, ``CLIPTextModel`` (``dimo_jax.converters.meissonic``, ``meissonic_vq``,
  ``clip_text``). ``--input`` is the released subfolder, the Meissonic folder holding it, or the
  ``.safetensors`` file; the architecture comes from the ``config.json`` beside the weights.

Transformer outputs are checkpoint directories: the orbax checkpoint of
``{'params', 'ema_params'}`` (both the converted weights) plus ``config.json`` with the model
configuration and the data sizes (``dimo_jax.storage.checkpoints`` format, read by ``load_params``).
VQGAN outputs are directories holding ``params.msgpack`` (``flax.serialization.to_bytes`` of
``{'params': ...}``) and ``vqgan.json`` (``{"kind": "taming"|"google", "config": {...}}``); read
them with ``load_vqgan``. Meissonic outputs are directories holding ``params.msgpack`` and
``config.json`` (``{"kind": "meissonic"|"meissonic-vq"|"clip-text", "config": {...}}``); read them
with ``load_meissonic``, ``load_meissonic_vq``, ``load_clip_text``. The Meissonic tokenizer needs no
conversion: ``configs/meissonic.py`` points at the released ``tokenizer/`` folder.

Files are read without executing code: ``torch.load(..., weights_only=True)`` (torch is imported
only here, inside the functions) and ``flax.serialization.msgpack_restore``. Every converter
checks names and shapes strictly and lists every missing, unexpected or mis-shaped entry.

Command line::

  python -m dimo_jax.convert valeoai --input=MaskGIT_ImageNet_256.pth --output=pretrained/maskgit_teacher --heads=16
  python -m dimo_jax.convert dimo-generator --input=pytorch_model.bin --output=pretrained/dimo_generator --heads=16
  python -m dimo_jax.convert google-maskgit --input=maskgit_imagenet256_checkpoint --output=pretrained/maskgit_google
  python -m dimo_jax.convert taming-vqgan --input=last.ckpt --output=pretrained/vqgan_taming
  python -m dimo_jax.convert google-vqgan --input=tokenizer_imagenet256_checkpoint --output=pretrained/vqgan_google
  python -m dimo_jax.convert meissonic --input=Meissonic/transformer --output=pretrained/meissonic/transformer
  python -m dimo_jax.convert meissonic-vq --input=Meissonic/vqvae --output=pretrained/meissonic/vqvae
  python -m dimo_jax.convert clip-text --input=Meissonic/text_encoder --output=pretrained/meissonic/text_encoder

``--input`` may also be a Hugging Face model id read from the local Hugging Face cache
(``--input=MeissonFlow/Meissonic:transformer``, or ``--subfolder`` / ``--revision``;
``--allow_download`` to fetch what is missing): ``dimo_jax.converters.hf_cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp

from dimo_jax import console
from dimo_jax.converters import clip_text, google_vqgan, hf_cache, meissonic, meissonic_vq, taming
from dimo_jax.converters.google_maskgit import convert_google_maskgit_file
from dimo_jax.converters.valeoai import convert_dimo_generator, convert_valeoai_file
from dimo_jax.storage.loaders import _vqgan_config, save_vqgan

KINDS = ("valeoai", "dimo-generator", "google-maskgit", "taming-vqgan", "google-vqgan",
         "meissonic", "meissonic-vq", "clip-text")
MEISSONIC_KINDS = ("meissonic", "meissonic-vq", "clip-text")


def convert_vqgan_file(kind: str, input_path: str, output: str,
                       vqgan_fields: Optional[Mapping[str, Any]] = None, allow_nonfinite: bool = False) -> str:
  """Taming ``.ckpt`` (``kind='taming'``) or Google tokenizer msgpack (``'google'``) -> ``output``."""
  cfg = _vqgan_config(kind, vqgan_fields)
  if kind == "taming":
    variables = taming.load_taming_checkpoint(input_path, cfg, allow_nonfinite=allow_nonfinite)
  else:
    variables = google_vqgan.load_google_tokenizer(input_path, cfg, allow_nonfinite=allow_nonfinite)
  return save_vqgan(output, variables, kind, cfg)


def convert_meissonic_kind(kind: str, input_path: str, output: str, overwrite: bool = False,
                           param_dtype: str = "", allow_nonfinite: bool = False) -> str:
  """One network of the Meissonic release (``kind`` in ``MEISSONIC_KINDS``) -> ``output``.

  Refuses an ``output`` that already holds a converted model unless ``overwrite``;
  ``param_dtype`` (transformer only) stores its parameters in that dtype (e.g. ``bfloat16``);
  ``allow_nonfinite`` converts weights holding NaN / inf (refused otherwise).
  """
  if kind not in MEISSONIC_KINDS:
    raise ValueError(f"{kind!r} is not a Meissonic kind; choose one of {MEISSONIC_KINDS}")
  if param_dtype and kind != "meissonic":
    raise ValueError(f"--param_dtype applies to the meissonic transformer only, not {kind}")
  if param_dtype:
    try:
      param_dtype = jnp.dtype(param_dtype).name
    except TypeError:
      raise ValueError(f"--param_dtype={param_dtype!r} is not a dtype; use float32, bfloat16 or "
                       "float16") from None
  held = [f for f in ("params.msgpack", "config.json") if os.path.isfile(os.path.join(output, f))]
  if held and not overwrite:
    raise FileExistsError(f"{output} already holds {' and '.join(held)}; pass --overwrite to "
                          "replace them, or choose another --output")
  if kind == "meissonic":
    overrides = {"param_dtype": param_dtype} if param_dtype else {}
    meissonic.convert_meissonic(input_path, output, allow_nonfinite=allow_nonfinite, **overrides)
  elif kind == "meissonic-vq":
    meissonic_vq.convert_meissonic_vq(input_path, output, allow_nonfinite=allow_nonfinite)
  else:
    clip_text.convert_clip_text(input_path, output, allow_nonfinite=allow_nonfinite)
  return output


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dimo_jax.convert",
      description="Convert published MaskGIT / Di[M]O / VQGAN / Meissonic checkpoints into "
                  "dimo_jax checkpoints.",
      epilog="Meissonic (text-to-image): meissonic --input=<Meissonic>/transformer, meissonic-vq "
             "--input=<Meissonic>/vqvae, clip-text --input=<Meissonic>/text_encoder; --input may "
             "also be the Meissonic folder itself or a .safetensors file (safetensors only).")
  parser.add_argument("kind", choices=KINDS)
  parser.add_argument("--input", required=True,
                      help="the published checkpoint file (Meissonic kinds: the released subfolder, "
                           "the Meissonic folder holding it, or its .safetensors file), or a Hugging Face "
                           "model id <org>/<name>[@<revision>][:<path in the repository>] read from the "
                           "local Hugging Face cache")
  parser.add_argument("--subfolder", default="", help="model ids: the folder or file inside the repository")
  parser.add_argument("--revision", default="", help="model ids: the branch, tag or commit (default main)")
  parser.add_argument("--allow_download", action="store_true",
                      help="model ids: download what the Hugging Face cache lacks (default: cache only)")
  parser.add_argument("--output", required=True, help="the directory to write")
  parser.add_argument("--heads", type=int, default=None,
                      help="attention heads (valeoai / dimo-generator; default 16 for width 768)")
  parser.add_argument("--codebook_size", type=int, default=None,
                      help="codes in the vocabulary (needed when the table is not the published size)")
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --output")
  parser.add_argument("--vqgan_config", default="",
                      help="JSON object of TamingConfig / GoogleVQGANConfig fields (default: published)")
  parser.add_argument("--param_dtype", default="",
                      help="meissonic only: store the transformer's parameters in this dtype "
                           "(e.g. bfloat16, half the bytes; default float32)")
  parser.add_argument("--allow_nonfinite", action="store_true",
                      help="convert weights holding NaN / inf (refused by default, naming them)")
  parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings and log lines")
  args = parser.parse_args(argv)
  quiet = console.setup(None, args.verbose)
  try:
    out = _convert(args)
  finally:
    quiet.close()
  print(f"wrote {out}")
  return 0


def _convert(args) -> str:
  """Runs the converter ``args.kind`` names; returns the folder written."""
  args.input = hf_cache.resolve_input(args.input, args.subfolder, args.revision, args.allow_download)
  finite = {"allow_nonfinite": args.allow_nonfinite}
  if args.kind in MEISSONIC_KINDS:
    out = convert_meissonic_kind(args.kind, args.input, args.output, overwrite=args.overwrite,
                                 param_dtype=args.param_dtype, **finite)
  elif args.kind == "valeoai":
    out = convert_valeoai_file(args.input, args.output, heads=args.heads,
                               codebook_size=args.codebook_size, num_classes=args.num_classes,
                               overwrite=args.overwrite, **finite)
  elif args.kind == "dimo-generator":
    out = convert_dimo_generator(args.input, args.output, heads=args.heads,
                                 codebook_size=args.codebook_size, num_classes=args.num_classes,
                                 overwrite=args.overwrite, **finite)
  elif args.kind == "google-maskgit":
    out = convert_google_maskgit_file(args.input, args.output, codebook_size=args.codebook_size,
                                      num_classes=args.num_classes, overwrite=args.overwrite, **finite)
  else:
    try:
      fields = json.loads(args.vqgan_config) if args.vqgan_config else {}
    except json.JSONDecodeError as e:
      raise ValueError(f"--vqgan_config is not valid JSON: {e}") from e
    if not isinstance(fields, dict):
      raise ValueError(f"--vqgan_config must be a JSON object of config fields, got {args.vqgan_config!r}")
    out = convert_vqgan_file(args.kind.split("-")[0], args.input, args.output, fields, **finite)
  return out


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
