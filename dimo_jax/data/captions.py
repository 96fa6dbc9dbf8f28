"""Captioned digits: prompts measured from scikit-learn's 8x8 digits, a word-level tokenizer and the
fixed text encoder that turns them into Meissonic-style conditions.

Attributes, measured on each 8x8 image ``x`` (grey levels 0..16), with intensity-weighted moments
over rows ``r`` and columns ``c``:

- thickness: the mean ink ``mean(x) / 16``; ``thick`` above the median of the image's digit class
  (measured on the training split), ``thin`` otherwise;
- slant: the shear ``-cov(r, c) / var(r)`` (positive when the top leans right); ``slanted`` above
  the class median, ``upright`` otherwise.

The thresholds are per class, so every digit has as many thick as thin and as many slanted as
upright images. A prompt names the digit and optionally each attribute: ``"a thick slanted
seven"``, ``"an upright eight"``, ``"a two"``; the empty prompt ``""`` is the unconditional (and
negative) prompt. Caption ids: ``0`` is ``""``, ``1 + 9 d + 3 t + s`` with ``t, s`` in ``0``
(absent), ``1`` (thick / slanted), ``2`` (thin / upright). The 40 full prompts (both attributes
given) are split into those seen in distillation and ``held_out_prompts`` (one per digit), which
Di[M]O never sees.

The tokenizer (``word_tokenizer``) is a closed word-level vocabulary wrapped in the CLIP
tokenizer's interface (``data.text.CLIPTokenizer``: start, words, end, padding to ``max_length``).
The text encoder is ``networks.clip_text.CLIPTextModel`` at a tiny size with FIXED random weights
(seeded): as the authors freeze CLIP, the teacher learns to read the frozen features (its
``context_embedder`` and ``cond_embed`` are trained) and the generator and auxiliary see exactly the
teacher's conditions; every caption's condition is computed once (``condition_table``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

from dimo_jax.data import datasets
from dimo_jax.data import text as text_lib
from dimo_jax.networks import clip_text

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thick", "thin")
SLANT = ("slanted", "upright")
ATTRIBUTES = ("thickness", "slant")
NUM_CAPTIONS = 1 + 10 * 9
UNK = "<unk>"
VOCAB = (text_lib.BOS_TOKEN, text_lib.EOS_TOKEN, UNK, "a", "an", *THICKNESS, *SLANT, *DIGIT_WORDS)
MAX_LENGTH = 8


# ---------------------------------------------------------------------------- attributes
def measure(tokens, levels: int = 17) -> Dict[str, np.ndarray]:
  """Per-image ``ink`` and ``slant`` of ``[N, 64]`` grey-level tokens (see the module docstring)."""
  x = np.asarray(tokens, np.float64).reshape(-1, 8, 8) / float(levels - 1)
  r = np.arange(8, dtype=np.float64)[None, :, None]
  c = np.arange(8, dtype=np.float64)[None, None, :]
  mass = np.maximum(x.sum((1, 2)), 1e-6)
  cy = (x * r).sum((1, 2)) / mass
  cx = (x * c).sum((1, 2)) / mass
  dy, dx = r - cy[:, None, None], c - cx[:, None, None]
  var_r = np.maximum((x * dy * dy).sum((1, 2)) / mass, 1e-6)
  cov = (x * dy * dx).sum((1, 2)) / mass
  return {"ink": x.mean((1, 2)), "slant": -cov / var_r}


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Per-class medians ``[10]`` of ink and slant (from the training split)."""
  ink: Tuple[float, ...]
  slant: Tuple[float, ...]

  @classmethod
  def fit(cls, tokens, labels) -> "Thresholds":
    m = measure(tokens)
    labels = np.asarray(labels)
    med = lambda v: tuple(float(np.median(v[labels == d])) for d in range(10))
    return cls(ink=med(m["ink"]), slant=med(m["slant"]))

  def attributes(self, tokens, digits) -> np.ndarray:
    """``[N, 2]`` attribute values (1: thick / slanted, 2: thin / upright) of images read as ``digits``."""
    m = measure(tokens)
    d = np.asarray(digits, np.int64)
    thick = np.where(m["ink"] > np.asarray(self.ink)[d], 1, 2)
    slanted = np.where(m["slant"] > np.asarray(self.slant)[d], 1, 2)
    return np.stack([thick, slanted], 1).astype(np.int32)


# ---------------------------------------------------------------------------- captions
def caption_id(digit, thickness=0, slant=0):
  """Caption id of (digit, thickness, slant); attribute 0 = not mentioned."""
  return 1 + 9 * np.asarray(digit) + 3 * np.asarray(thickness) + np.asarray(slant)


def caption_parts(cid: int) -> Tuple[int, int, int]:
  """(digit, thickness, slant) of a caption id >= 1."""
  rest = int(cid) - 1
  if not 0 <= rest < 90:
    raise ValueError(f"caption id {cid} names no digit (valid: 1..90)")
  return rest // 9, (rest % 9) // 3, rest % 3


def caption_text(cid: int) -> str:
  """The prompt of a caption id ("" for 0)."""
  if int(cid) == 0:
    return ""
  d, t, s = caption_parts(cid)
  words = ([THICKNESS[t - 1]] if t else []) + ([SLANT[s - 1]] if s else []) + [DIGIT_WORDS[d]]
  article = "an" if words[0][0] in "aeiou" else "a"
  return " ".join([article, *words])


def all_captions() -> List[str]:
  return [caption_text(i) for i in range(NUM_CAPTIONS)]


def full_prompt_ids() -> np.ndarray:
  """The 40 caption ids that name the digit and both attributes (digit-major)."""
  return np.asarray([caption_id(d, t, s) for d in range(10) for t in (1, 2) for s in (1, 2)], np.int32)


def held_out_prompts() -> np.ndarray:
  """One full prompt per digit (attribute pair ``d % 4``), never seen by Di[M]O."""
  full = full_prompt_ids().reshape(10, 4)
  return np.asarray([full[d, d % 4] for d in range(10)], np.int32)


DISTILL_PROMPT_SETS = ("full", "all")


def distill_prompts(prompt_set: str = "full") -> np.ndarray:
  """The prompts Di[M]O distils from: ``full``, the 30 full prompts that are not held out;
  ``all``, every non-empty caption but the held-out full prompts (80: the 30, and the 50 that
  leave one or both attributes out)."""
  if prompt_set not in DISTILL_PROMPT_SETS:
    raise ValueError(f"config.distill.prompt_set={prompt_set!r} is not one of {DISTILL_PROMPT_SETS}")
  held = set(held_out_prompts().tolist())
  pool = full_prompt_ids() if prompt_set == "full" else np.arange(1, NUM_CAPTIONS)
  return np.asarray([c for c in pool if int(c) not in held], np.int32)


def training_captions(rng: np.random.Generator, digits, attributes, *, attribute_dropout: float,
                      null_prob: float) -> np.ndarray:
  """Caption ids of training images: each attribute dropped with ``attribute_dropout``, the whole
  caption replaced by ``""`` with ``null_prob`` (for guidance against the empty prompt)."""
  digits = np.asarray(digits)
  attributes = np.asarray(attributes)
  keep = rng.random(attributes.shape) >= attribute_dropout
  attrs = np.where(keep, attributes, 0)
  ids = caption_id(digits, attrs[:, 0], attrs[:, 1])
  return np.where(rng.random(digits.shape) < null_prob, 0, ids).astype(np.int32)


# ---------------------------------------------------------------------------- tokenizer
def word_tokenizer(max_length: int = MAX_LENGTH) -> text_lib.CLIPTokenizer:
  """Word-level tokenizer over ``VOCAB`` with the CLIP tokenizer's start / end / padding layout."""
  tok = tokenizers.Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return text_lib.CLIPTokenizer(tok, pad_token=text_lib.EOS_TOKEN, max_length=max_length,
                                source="captioned digits vocabulary")


# ---------------------------------------------------------------------------- text encoder
def encoder_config(width: int = 32, layers: int = 2, heads: int = 2, mlp_dim: int = 64,
                   projection_dim: int = 64, max_length: int = MAX_LENGTH) -> clip_text.CLIPTextConfig:
  """A tiny CLIP text tower over ``VOCAB``, pooling at the first end-of-text token."""
  return clip_text.CLIPTextConfig(vocab_size=len(VOCAB), width=width, layers=layers, heads=heads,
                                  mlp_dim=mlp_dim, max_positions=max_length,
                                  projection_dim=projection_dim, eos_token_id=VOCAB.index(text_lib.EOS_TOKEN))


def encode_prompts(prompts: Sequence[str], config: clip_text.CLIPTextConfig, seed: int,
                   tokenizer=None) -> Dict[str, np.ndarray]:
  """``{"text": [N, T, width], "pooled": [N, projection_dim]}`` from the fixed encoder (weights
  drawn from ``seed``), computed under ``jax.jit``."""
  tokenizer = (tokenizer or word_tokenizer(config.max_positions)).check_fits(config.vocab_size)
  ids = jnp.asarray(tokenizer.encode(list(prompts)))
  model = clip_text.CLIPTextModel(config)
  params = jax.jit(model.init)(jax.random.key(seed), ids[:1])["params"]
  out = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, ids)
  return {"text": np.asarray(out["penultimate"], np.float32), "pooled": np.asarray(out["pooled"], np.float32)}


def condition_table(config: clip_text.CLIPTextConfig, seed: int) -> Dict[str, np.ndarray]:
  """Conditions of every caption id (``[NUM_CAPTIONS, ...]``, row 0 the empty prompt)."""
  return encode_prompts(all_captions(), config, seed)


def gather(table: Dict[str, np.ndarray], ids) -> Dict[str, np.ndarray]:
  """The conditions of caption ids ``ids`` (any shape) from ``condition_table``."""
  ids = np.asarray(ids)
  return {k: v[ids] for k, v in table.items()}


# ---------------------------------------------------------------------------- the data a run reads
@dataclasses.dataclass
class CaptionedData:
  """The digits, their attribute values, the thresholds and every caption's condition."""
  ds: datasets.TokenDataset
  thresholds: Thresholds
  train_attrs: np.ndarray  # [N, 2]
  table: dict  # caption id -> condition leaves
  encoder: object  # clip_text.CLIPTextConfig


def load_captioned(config, stored: Optional[dict] = None) -> CaptionedData:
  """The data, the thresholds fitted on it and the condition table of ``config.captions``, or,
  given a teacher's stored ``config.json`` (``stored``), of the text encoder that teacher was
  trained with (its ``text_encoder`` and encoder seed), whatever sizes this config names."""
  dc, cc = config.data, config.captions
  ds = datasets.load_digits(levels=int(dc.levels), val_fraction=float(dc.val_fraction), seed=int(dc.seed))
  th = Thresholds.fit(ds.train_tokens, ds.train_labels)
  if stored:
    enc, seed = stored_encoder(stored, int(cc.encoder_seed))
  else:
    enc = encoder_config(width=int(cc.encoder_width), layers=int(cc.encoder_layers),
                                  heads=int(cc.encoder_heads), mlp_dim=int(cc.encoder_mlp_dim),
                                  projection_dim=int(config.model.num_heads) * int(config.model.head_dim))
    seed = int(cc.encoder_seed)
  table = condition_table(enc, seed)
  return CaptionedData(ds, th, th.attributes(ds.train_tokens, ds.train_labels), table, enc)


def stored_encoder(stored: dict, default_seed: int):
  """``(CLIPTextConfig, seed)`` of the text encoder a teacher's ``config.json`` records (a
  missing or malformed entry is a ``ValueError`` naming the file's key and the fix)."""
  entry = stored.get("text_encoder")
  try:
    enc = clip_text.CLIPTextConfig(**entry)
  except (TypeError, ValueError) as e:
    raise ValueError(f"the teacher's config.json has no usable 'text_encoder' entry ({e}); retrain the teacher "
                     "with --config.mode=teacher") from None
  return enc, int((stored.get("captions") or {}).get("encoder_seed", default_seed))
