"""Converters from published MaskGIT checkpoints to dimo_jax checkpoints.

Sources (layouts: ``reference/dimo_reference.md`` section 3):

- ``valeoai``: the valeoai MaskGIT PyTorch teacher (``MaskGIT_ImageNet_256.pth``), the Di[M]O
  paper's teacher -> ``MaskTransformer`` (arch ``'preln'``).
- ``dimo-generator``: the Di[M]O authors' one-step generator (``pytorch_model.bin``, the same
  layout) -> a generator checkpoint.
- ``google-maskgit``: Google's JAX MaskGIT msgpack (``maskgit_imagenet256_checkpoint``) ->
  ``BertMaskTransformer`` (arch ``'bert'``).
- ``taming-vqgan`` / ``google-vqgan``: the two VQGAN tokenizers (``dimo_jax.networks.vqgan``, ``dimo_jax.networks.vqgan_google``).

Transformer outputs are checkpoint directories: the orbax checkpoint of
``{'params', 'ema_params'}`` (both the converted weights) plus ``config.json`` with the model
configuration and the data sizes (``dimo_jax.storage.checkpoints`` format, read by ``load_params``).
VQGAN outputs are directories holding ``params.msgpack`` (``flax.serialization.to_bytes`` of
``{'params': ...}``) and ``vqgan.json`` (``{"kind": "taming"|"google", "config": {...}}``); read
them with ``load_vqgan``.

Files are read without executing code: ``torch.load(..., weights_only=True)`` (torch is imported
only here, inside the functions) and ``flax.serialization.msgpack_restore``. Every converter
checks names and shapes strictly and lists every missing, unexpected or mis-shaped entry.

Command line::

  python -m dimo_jax.convert valeoai --input=MaskGIT_ImageNet_256.pth --output=pretrained/maskgit_teacher --heads=16
  python -m dimo_jax.convert dimo-generator --input=pytorch_model.bin --output=pretrained/dimo_generator --heads=16
  python -m dimo_jax.convert google-maskgit --input=maskgit_imagenet256_checkpoint --output=pretrained/maskgit_google
  python -m dimo_jax.convert taming-vqgan --input=last.ckpt --output=pretrained/vqgan_taming
  python -m dimo_jax.convert google-vqgan --input=tokenizer_imagenet256_checkpoint --output=pretrained/vqgan_google
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Mapping, Optional, Sequence

from dimo_jax.converters import google_vqgan, taming
from dimo_jax.converters.google_maskgit import convert_google_maskgit_file
from dimo_jax.converters.valeoai import convert_dimo_generator, convert_valeoai_file
from dimo_jax.storage.loaders import _vqgan_config, save_vqgan

KINDS = ("valeoai", "dimo-generator", "google-maskgit", "taming-vqgan", "google-vqgan")


def convert_vqgan_file(kind: str, input_path: str, output: str,
                       vqgan_fields: Optional[Mapping[str, Any]] = None) -> str:
  """Taming ``.ckpt`` (``kind='taming'``) or Google tokenizer msgpack (``'google'``) -> ``output``."""
  cfg = _vqgan_config(kind, vqgan_fields)
  if kind == "taming":
    variables = taming.load_taming_checkpoint(input_path, cfg)
  else:
    variables = google_vqgan.load_google_tokenizer(input_path, cfg)
  return save_vqgan(output, variables, kind, cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dimo_jax.convert",
      description="Convert published MaskGIT / Di[M]O / VQGAN checkpoints into dimo_jax checkpoints.")
  parser.add_argument("kind", choices=KINDS)
  parser.add_argument("--input", required=True, help="the published checkpoint file")
  parser.add_argument("--output", required=True, help="the directory to write")
  parser.add_argument("--heads", type=int, default=None,
                      help="attention heads (valeoai / dimo-generator; default 16 for width 768)")
  parser.add_argument("--codebook_size", type=int, default=None,
                      help="codes in the vocabulary (needed when the table is not the published size)")
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --output")
  parser.add_argument("--vqgan_config", default="",
                      help="JSON object of TamingConfig / GoogleVQGANConfig fields (default: published)")
  args = parser.parse_args(argv)
  if args.kind == "valeoai":
    out = convert_valeoai_file(args.input, args.output, heads=args.heads,
                               codebook_size=args.codebook_size, num_classes=args.num_classes,
                               overwrite=args.overwrite)
  elif args.kind == "dimo-generator":
    out = convert_dimo_generator(args.input, args.output, heads=args.heads,
                                 codebook_size=args.codebook_size, num_classes=args.num_classes,
                                 overwrite=args.overwrite)
  elif args.kind == "google-maskgit":
    out = convert_google_maskgit_file(args.input, args.output, codebook_size=args.codebook_size,
                                      num_classes=args.num_classes, overwrite=args.overwrite)
  else:
    try:
      fields = json.loads(args.vqgan_config) if args.vqgan_config else {}
    except json.JSONDecodeError as e:
      raise ValueError(f"--vqgan_config is not valid JSON: {e}") from e
    if not isinstance(fields, dict):
      raise ValueError(f"--vqgan_config must be a JSON object of config fields, got {args.vqgan_config!r}")
    out = convert_vqgan_file(args.kind.split("-")[0], args.input, args.output, fields)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
