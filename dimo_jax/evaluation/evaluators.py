"""The evaluators of ``mode=evaluate`` as plug-ins, chosen by name, and the one writer of their table.

An evaluator is a function ``evaluate(request) -> Result`` registered under a name
(``@register("name")``). ``config.evaluate.evaluators`` names the ones a run uses (a list, or a
comma-separated string); left empty, the family's defaults (``Family.evaluators``) run:

| name | family | what it fills |
|---|---|---|
| ``image_sets`` | classes | FID / IS / PRDC of decoded images, or pixel- and classifier-space distances (``evaluation.table1``) |
| ``token_tv`` | classes | the label-free token scores: sequence / position / pair TV, the teacher's bound (``evaluation.table1``) |
| ``prompt_following`` | captioned_digits | prompt accuracy, FD and diversity per prompt (``evaluation.prompt_following``) |
| ``t2i_export`` | meissonic | the HPS v2 / GenEval images for their official scorers (``evaluation.t2i_export``) |
| ``text_lm`` | text | gen. perplexity under a reference LM, unigram entropy, distinct and repeated n-grams (``evaluation.text_eval``) |

Every evaluator fills the rows of the same request: the teacher at its step counts and the
generator at one step (rows are merged by their ``name``, so two evaluators add their columns to
one row). ``write_results`` writes ``results.json`` and ``table.md`` once, atomically, whatever
the evaluators were.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
from absl import logging

from dimo_jax.evaluation.sample_sets import write_json
from dimo_jax.storage import checkpoints

# name -> "module:function"; the module registers the function under that name when imported.
EVALUATORS = {
    "image_sets": "dimo_jax.evaluation.table1:evaluate_image_sets",
    "token_tv": "dimo_jax.evaluation.table1:evaluate_token_tv",
    "prompt_following": "dimo_jax.evaluation.prompt_following:evaluate_prompt_following",
    "t2i_export": "dimo_jax.evaluation.t2i_export:evaluate_t2i_export",
    "text_lm": "dimo_jax.evaluation.text_eval:evaluate_text_lm",
}
EVAL_SUBDIR = "eval"
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
_REGISTERED: Dict[str, Callable] = {}


@dataclasses.dataclass
class Result:
  """What one evaluator returns: result ``rows`` (dicts with a ``name``, merged with the other
  evaluators' rows of that name) and ``extra`` top-level entries of ``results.json``."""
  rows: List[dict]
  extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Request:
  """One ``mode=evaluate`` run as its evaluators see it: the config, the workdir, the output folder
  (``config.evaluate.output_dir``, default ``<workdir>/eval``) and the family. ``shared``: what
  evaluators of one family compute once for all (drawn sample sets); ``finish``: steps run on the
  merged results before they are written; ``format``: the markdown of the merged results."""
  config: Any
  workdir: str
  out_dir: str
  family: str
  shared: Dict[str, Any] = dataclasses.field(default_factory=dict)
  finish: List[Callable[[dict], None]] = dataclasses.field(default_factory=list)
  format: Optional[Callable[[dict], str]] = None


def register(name: str) -> Callable:
  """Decorator: registers ``fn(request) -> Result`` as the evaluator ``name`` (listed in
  ``EVALUATORS``)."""
  def wrap(fn):
    _REGISTERED[name] = fn
    return fn
  return wrap


def get_evaluator(name: str) -> Callable:
  """The evaluator registered as ``name``; an unknown name is a ``ValueError`` listing the known."""
  if name not in EVALUATORS:
    raise ValueError(f"config.evaluate.evaluators names {name!r}, which is not an evaluator; choose from "
                     f"{', '.join(EVALUATORS)}")
  if name not in _REGISTERED:
    importlib.import_module(EVALUATORS[name].split(":")[0])
  return _REGISTERED[name]


def evaluator_names(config, family: str, defaults: Tuple[str, ...] = ()) -> Tuple[str, ...]:
  """``config.evaluate.evaluators`` (a list or a comma-separated string), or ``defaults`` (the
  family's ``Family.evaluators``) when it is empty or absent; every name checked."""
  ec = config.get("evaluate", None) if hasattr(config, "get") else None
  raw = ec.get("evaluators", ()) if ec is not None else ()
  names = tuple(n.strip() for n in raw.split(",")) if isinstance(raw, str) else tuple(raw or ())
  names = tuple(n for n in names if n) or tuple(defaults)
  if not names:
    raise ValueError(f"config.family={family!r} has no default evaluators; name them with "
                     f"--config.evaluate.evaluators=<{'|'.join(EVALUATORS)}>")
  for name in names:
    get_evaluator(name)
  return names


def output_dir(config, workdir: str) -> str:
  """``config.evaluate.output_dir``, default ``<workdir>/eval``."""
  ec = config.get("evaluate", None) if hasattr(config, "get") else None
  return (ec.get("output_dir", "") if ec is not None else "") or os.path.join(os.fspath(workdir), EVAL_SUBDIR)


def merge_rows(row_lists: Sequence[Sequence[dict]]) -> List[dict]:
  """Rows of several evaluators merged by ``name`` (in the order names first appear; a later
  evaluator's columns are added to the row, its values win)."""
  merged: Dict[str, dict] = {}
  for rows in row_lists:
    for row in rows:
      merged.setdefault(row["name"], {}).update(row)
  return list(merged.values())


def run_evaluators(request: Request, names: Sequence[str], evaluators: Optional[Dict[str, Callable]] = None) -> dict:
  """Runs the evaluators ``names`` on ``request`` (``evaluators`` may hold some of them, e.g. bound
  to networks already in memory); returns the merged results (``rows``, the evaluators' extra
  entries, ``family``, ``evaluators``) after the request's finishing steps."""
  given = evaluators or {}
  outputs = [(given.get(name) or get_evaluator(name))(request) for name in names]
  results: Dict[str, Any] = {"rows": merge_rows([o.rows for o in outputs])}
  for out in outputs:
    results.update(out.extra)
  for step in request.finish:
    step(results)
  results["family"], results["evaluators"] = request.family, list(names)
  return results


def rows_table(results: dict) -> str:
  """A markdown table of the rows: ``name`` and every scalar column some row has."""
  rows = results.get("rows", [])
  cols = []
  for r in rows:
    cols += [k for k, v in r.items() if k != "name" and k not in cols and isinstance(v, (int, float, str))]
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
  lines = ["| " + " | ".join(["name"] + cols) + " |", "|---|" + "---|" * len(cols)]
  lines += ["| " + " | ".join([str(r["name"])] + [fmt(r.get(k)) for k in cols]) + " |" for r in rows]
  return "\n".join(lines)


def write_results(out_dir: str, results: dict, table: str) -> Dict[str, str]:
  """The one writer of an evaluation: ``results.json`` (``results`` with ``files``) and
  ``table.md`` (``table``) in ``out_dir``, each written atomically, by process 0 only. Returns
  ``{"table", "results"}`` (the paths)."""
  files = {"table": os.path.join(out_dir, TABLE_FILE), "results": os.path.join(out_dir, RESULTS_FILE)}
  results.setdefault("files", {}).update(files)
  if jax.process_index() == 0:
    checkpoints.atomic_write_bytes(files["table"], (table.rstrip("\n") + "\n").encode("utf-8"))
    plot = write_plot(out_dir, results)
    if plot:
      files["plot"] = results["files"]["plot"] = plot
    write_json(files["results"], results)
  return files


def write_plot(out_dir: str, results: dict) -> Optional[str]:
  """``quality.png`` in ``out_dir``: each quality metric of the rows against steps and against
  milliseconds per sample (``evaluation.plots``); None, with one log line, where the rows hold no
  metric to draw (an export of images for external scorers)."""
  from dimo_jax.evaluation import plots  # pylint: disable=import-outside-toplevel (matplotlib)
  path = os.path.join(out_dir, plots.DEFAULT_NAME)
  try:
    plots.plot_results(results, path, source=os.path.join(out_dir, RESULTS_FILE))
  except ValueError as e:
    logging.info("No quality plot: %s", e)
    return None
  return path


def evaluate(request: Request, names: Sequence[str], evaluators: Optional[Dict[str, Callable]] = None) -> dict:
  """``run_evaluators`` then ``write_results`` with the request's table format (``rows_table``
  when it sets none); returns the results, with the markdown under ``table``."""
  results = run_evaluators(request, names, evaluators)
  table = (request.format or rows_table)(results)
  write_results(request.out_dir, results, table)
  results["table"] = table
  return results
