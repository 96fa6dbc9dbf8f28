"""The text-to-image benchmarks' prompt files and the folder layouts their official (PyTorch)
scorers read: HPS v2 and GenEval.

HPS v2 (github tgxs002/HPSv2, ``hpsv2/evaluation.py``): the benchmark prompts are four JSON files,
``anime.json``, ``concept-art.json``, ``paintings.json`` and ``photo.json``, each a list of prompt
strings (800 each; ``hpsv2.benchmark_prompts('all')`` downloads them from the Hugging Face dataset
``zhwang/HPDv2``, folder ``benchmark/``, into ``~/.cache/hpsv2/datasets/benchmark``).
``hpsv2.evaluate(<folder>, hps_version='v2.0')`` lists ``<folder>`` and takes EVERY entry as a
style, reading ``<data_path>/<style>.json`` and the images ``<folder>/<style>/<index:05d>.jpg``
(one per prompt, ``index`` the prompt's position in the list): the folder must hold the style
folders and nothing else. A style's score is the mean of its 80-prompt chunk means, "Average" the
mean over every image; ``hps_version`` defaults to ``v2.1``, so pass ``v2.0`` for the paper's
numbers.

GenEval (github djghosh13/geneval, ``evaluation/evaluate_images.py``,
``generation/diffusers_generate.py``): the prompts are ``prompts/evaluation_metadata.jsonl``, one
JSON object per line with ``tag``, ``include`` (and ``exclude``) and ``prompt`` (553 lines). The
scorer walks the digit-named folders of ``<folder>``, reads ``<folder>/<index:05d>/metadata.jsonl``
(one JSON object: the prompt's line) and every ``samples/<digits>.png`` beside it; the README shows
``samples/0000.png`` (the generation script writes ``00000.png``; either is read). Four images per
prompt, the seed reset before each prompt.

``read_*`` readers stop with a ``ValueError`` / ``FileNotFoundError`` naming the file, the line or
item and the fix; the ``*_path`` functions give the layouts.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, NamedTuple, Sequence

from dimo_jax.storage import text_files

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
HPS_PROMPTS_PER_STYLE = 800  # the released benchmark; a style's score averages chunks of 80
HPS_IMAGE_EXT = ".jpg"
GENEVAL_PROMPTS = 553
GENEVAL_SAMPLES = 4
GENEVAL_METADATA = "metadata.jsonl"
GENEVAL_SAMPLES_DIR = "samples"

HPS_HINT = ("the HPS v2 benchmark prompts are anime.json, concept-art.json, paintings.json and "
            "photo.json from the Hugging Face dataset zhwang/HPDv2 (folder benchmark/); "
            "python -c \"import hpsv2; hpsv2.benchmark_prompts('all')\" downloads them into "
            "~/.cache/hpsv2/datasets/benchmark. Point --config.evaluate.hps_prompts at that folder")
GENEVAL_HINT = ("GenEval's prompts are prompts/evaluation_metadata.jsonl of github djghosh13/geneval "
                "(553 lines); point --config.evaluate.geneval_metadata at that file")


# ---------------------------------------------------------------------------- HPS v2


def read_hps_prompts(folder: str, styles: Sequence[str] = HPS_STYLES) -> Dict[str, List[str]]:
  """``{style: [prompt, ...]}`` from ``<folder>/<style>.json`` (each a JSON list of strings).

  Raises:
    FileNotFoundError: the folder or a style's file is missing (named, with where to get it).
    ValueError: a file that is not JSON (its line), not a list, empty, or with an item that is not
      a non-empty string (its index).
  """
  folder = os.fspath(folder)
  if not folder or not os.path.isdir(folder):
    raise FileNotFoundError(f"HPS v2 prompt folder {folder!r} does not exist; {HPS_HINT}")
  if not styles:
    raise ValueError("no HPS v2 style asked; config.evaluate.hps_styles lists some of "
                     f"{', '.join(HPS_STYLES)}")
  out = {}
  for style in styles:
    path = os.path.join(folder, f"{style}.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing (HPS v2 style {style!r}); {HPS_HINT}")
    prompts = text_files.read_json(path, f"the HPS v2 prompt files are JSON lists of strings; {HPS_HINT}")
    if not isinstance(prompts, list):
      raise ValueError(f"{path} holds a JSON {type(prompts).__name__}, not a list of prompt "
                       f"strings; {HPS_HINT}")
    if not prompts:
      raise ValueError(f"{path} is empty (no prompt); {HPS_HINT}")
    for i, p in enumerate(prompts):
      if not isinstance(p, str) or not p.strip():
        raise ValueError(f"{path}, item {i}: {p!r} is not a non-empty prompt string; {HPS_HINT}")
    out[style] = prompts
  return out


def hps_image_path(folder: str, style: str, index: int) -> str:
  """``<folder>/<style>/<index:05d>.jpg``: what ``hpsv2.evaluate(<folder>)`` reads for prompt
  ``index`` of ``<style>.json``."""
  return os.path.join(folder, style, f"{index:05d}{HPS_IMAGE_EXT}")


# ---------------------------------------------------------------------------- GenEval


class GenEvalPrompt(NamedTuple):
  """One line of ``evaluation_metadata.jsonl``: the line as written and its parsed object."""
  line: str
  metadata: dict

  @property
  def prompt(self) -> str:
    return self.metadata["prompt"]


def read_geneval_metadata(path: str) -> List[GenEvalPrompt]:
  """The non-blank lines of GenEval's ``evaluation_metadata.jsonl``, in order (prompt ``i`` is
  the ``i``-th non-blank line, as GenEval numbers its folders).

  Raises:
    FileNotFoundError: no such file (with where to get it).
    ValueError: an empty file; a line that is not JSON, not an object, or lacks the string
      ``prompt`` or ``tag`` the scorer reads (its line number).
  """
  path = os.fspath(path)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"GenEval metadata file {path!r} not found; {GENEVAL_HINT}")
  out = []
  for number, raw in enumerate(text_files.read_lines(path, GENEVAL_HINT), 1):
    line = raw.strip()
    if not line:
      continue
    try:
      meta = json.loads(line)
    except (ValueError, RecursionError) as e:
      raise ValueError(f"{path}, line {number}: not valid JSON ({getattr(e, 'msg', e)}); each line of "
                       f"evaluation_metadata.jsonl is one JSON object; {GENEVAL_HINT}") from None
    if not isinstance(meta, dict):
      raise ValueError(f"{path}, line {number}: a JSON {type(meta).__name__}, not an object; "
                       f"{GENEVAL_HINT}")
    for key in ("prompt", "tag"):
      if not isinstance(meta.get(key), str) or not meta[key].strip():
        raise ValueError(f"{path}, line {number}: no {key!r} string (GenEval's scorer reads "
                         f"'prompt' and 'tag' of every line); {GENEVAL_HINT}")
    out.append(GenEvalPrompt(line, meta))
  if not out:
    raise ValueError(f"{path} is empty (no JSON line); {GENEVAL_HINT}")
  return out


def geneval_prompt_dir(folder: str, index: int) -> str:
  """``<folder>/<index:05d>``: prompt ``index``'s folder."""
  return os.path.join(folder, f"{index:05d}")


def geneval_metadata_path(folder: str, index: int) -> str:
  """``<folder>/<index:05d>/metadata.jsonl``: the prompt's line of ``evaluation_metadata.jsonl``."""
  return os.path.join(geneval_prompt_dir(folder, index), GENEVAL_METADATA)


def geneval_sample_path(folder: str, index: int, sample: int) -> str:
  """``<folder>/<index:05d>/samples/<sample:04d>.png`` (GenEval's README layout)."""
  return os.path.join(geneval_prompt_dir(folder, index), GENEVAL_SAMPLES_DIR, f"{sample:04d}.png")


# ---------------------------------------------------------------------------- scoring commands


def hps_commands(images: str, prompts_folder: str = "") -> List[str]:
  """The HPS v2.0 scoring commands for ``images`` (``<out>/hps``): ``hpsv2.evaluate`` (it
  downloads the prompts and ``HPS_v2_compressed.pt`` from the Hugging Face Hub, or reads its
  cache), and ``hpsv2.evaluation.evaluate`` reading ``prompts_folder`` (the files the images were
  drawn from) with a local checkpoint."""
  images = os.path.abspath(images).rstrip(os.sep)  # the scorer names the run after the last part
  cmds = [f"python -c \"import hpsv2; hpsv2.evaluate('{images}', hps_version='v2.0')\""]
  if prompts_folder:
    cmds.append("python -c \"from hpsv2 import evaluation; evaluation.evaluate(mode='benchmark', "
                f"root_dir='{images}', data_path='{os.path.abspath(prompts_folder)}', "
                "checkpoint_path='<HPS_v2_compressed.pt>', hps_version='v2.0')\"")
  return cmds


def geneval_commands(images: str, results: str, detector_folder: str = "<OBJECT_DETECTOR_FOLDER>") -> List[str]:
  """GenEval's two scoring commands, run in a checkout of github djghosh13/geneval (CUDA only):
  ``detector_folder`` holds ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth``
  (``evaluation/download_models.sh <folder>``)."""
  images, results = os.path.abspath(images).rstrip(os.sep), os.path.abspath(results)
  return [f"python evaluation/evaluate_images.py {images} --outfile {results} --model-path {detector_folder}",
          f"python evaluation/summary_scores.py {results}"]
