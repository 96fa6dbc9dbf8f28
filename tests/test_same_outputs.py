"""The one ``mode=sample`` and ``mode=evaluate`` draw what the per-family modes drew before them:
tokens, images and table rows at tiny size against ``tests/data/one_path_golden.json`` (recorded by
``tests/data/make_one_path_golden.py`` at the commit it names), bit for bit.

The one-step draw of the text-conditioned families now starts from ``core.masking.make_x_init``
(one x_init for every family) where it had its own; given the x_init the old draw used, it draws
the same tokens."""
import json
import os

import jax
import numpy as np
import pytest
from one_path_cases import (
  HPS,
  PROMPTS,
  captioned_config,
  captioned_setup,
  classes_evaluate_config,
  classes_sample_config,
  classes_setup,
  comparable_rows,
  load_golden,
  meissonic_config,
  pixels_sha1,
  write_hps,
  write_prompts,
)
from test_sample_text import release  # noqa: F401 (fixture)

from dimo_jax.core import samplers
from dimo_jax.evaluation import text_to_image
from dimo_jax.modes import evaluate, sample
from dimo_jax.networks import conditioning
from dimo_jax.storage import checkpoints, workdir_lock


@pytest.fixture(scope="module")
def golden():
  return load_golden()


def _with_family(cfg, family):
  cfg.family = family
  return cfg


def test_classes_sample_and_evaluate(golden, tmp_path):
  want = golden["classes"]
  setup = classes_setup(tmp_path)
  for name, kw in {"teacher_confidence": {}, "teacher_ancestral": {"sampler": "ancestral", "labels": "2,0"},
                   "generator": {"model": "generator", "checkpoint": setup["workdir"]}}.items():
    cfg = _with_family(classes_sample_config(setup, output=str(tmp_path / f"{name}.npy"), **kw), "classes")
    res = sample.run_sample(cfg, str(tmp_path))
    assert np.load(res["tokens"]).tolist() == want[name]["tokens"], name
    assert np.load(res["labels"]).tolist() == want[name]["labels"], name
  results = evaluate.run_evaluate(_with_family(classes_evaluate_config(setup), "classes"), setup["workdir"])
  assert comparable_rows(results["rows"]) == want["evaluate_rows"]
  assert results["evaluators"] == ["image_sets", "token_tv"] and results["family"] == "classes"
  with open(os.path.join(setup["workdir"], "eval", "results.json"), encoding="utf-8") as f:
    assert comparable_rows(json.load(f)["rows"]) == want["evaluate_rows"]


def test_meissonic_sample_and_t2i_export(golden, release, tmp_path):  # noqa: F811
  want = golden["meissonic"]
  prompts = write_prompts(tmp_path)
  res = sample.run_sample(_with_family(meissonic_config(release, prompts), "meissonic"), str(tmp_path / "w"))
  assert {os.path.basename(p): pixels_sha1(p) for p in res["images"]} == want["teacher_images"]
  with open(res["index"], encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == want["teacher_index"]
  # The generator's one step, given the x_init the old draw made, draws the old tokens.
  gen_cfg = meissonic_config(release, prompts, generator=str(release / "transformer"))
  settings = text_to_image.read_settings(gen_cfg, str(tmp_path / "g"))
  nets = text_to_image.load_networks(gen_cfg, 32, settings.generator)
  enc = text_to_image.encode_prompts(nets, PROMPTS, 3)
  cond = {**enc, "micro": np.broadcast_to(np.asarray(settings.micro_conds, np.float32), (3, 5))}
  tcfg = nets.transformer.config
  for i, row in enumerate(want["generator_rows"]):
    tokens = samplers.one_step_cond_sampler(
        conditioning.make_apply_fn(nets.transformer, conditions=True), nets.transformer_params, jax.random.PRNGKey(7 + i),
        {k: v[i:i + 1] for k, v in cond.items()}, seq_len=tcfg.seq_len, mask_id=tcfg.mask_id,
        codebook_size=tcfg.codebook_size, r_init=0.5, noise_sigma=0.3, temperature=1.0,
        x_init=np.asarray([row["x_init"]], np.int32))
    assert np.asarray(tokens)[0].tolist() == row["tokens"]
  ecfg = _with_family(meissonic_config(release, "", steps=2), "meissonic")
  ecfg.mode = "evaluate"
  ecfg.evaluate.update(suite="hps", hps_prompts=write_hps(tmp_path / "hps_prompts"), hps_styles=tuple(HPS),
                       output=str(tmp_path / "t2i"))
  results = evaluate.run_evaluate(ecfg, str(tmp_path / "w"))
  hps = tmp_path / "t2i" / "hps"
  assert {f"{s}/{f}": pixels_sha1(hps / s / f) for s in sorted(os.listdir(hps))
          for f in sorted(os.listdir(hps / s))} == want["hps_images"]
  assert results["rows"] == [{"name": "hps", "model": "teacher", "steps": 2, "images": want["hps_written"],
                              "written": want["hps_written"], "skipped": 0, "folder": str(hps)}]
  assert os.path.isfile(tmp_path / "w" / "eval" / "table.md")


def test_captioned_digits_evaluate(golden, tmp_path):
  want = golden["captioned_digits"]
  cfg = _with_family(captioned_config(), "captioned_digits")
  cfg.mode = "evaluate"
  captioned_setup(tmp_path, cfg)
  results = evaluate.run_evaluate(cfg, str(tmp_path))
  rows = [{k: v for k, v in r.items() if k != "name"} for r in comparable_rows(results["rows"])]
  # Real digits and the teacher at every step count: the same scores.
  assert rows[:-1] == want["rows"][:-1]
  assert rows[-1]["model"] == want["rows"][-1]["model"] == "Di[M]O generator"
  table = open(tmp_path / "eval" / "table.md", encoding="utf-8").read()
  assert table.splitlines()[:2 + 2 * (len(rows) - 1)] == want["table"].splitlines()[:2 + 2 * (len(rows) - 1)]


def _no_models(tmp_path) -> dict:
  """A classes setup whose folders are empty: the refusals come before anything is loaded."""
  os.makedirs(tmp_path / "distill")
  return {"root": tmp_path, "teacher": str(tmp_path / "teacher"), "workdir": str(tmp_path / "distill")}


def test_evaluate_refuses_a_held_or_unfinished_workdir(tmp_path):
  setup = _no_models(tmp_path)
  cfg = _with_family(classes_evaluate_config(setup), "classes")
  lock_path = os.path.join(setup["workdir"], workdir_lock.LOCK_FILE)
  with open(lock_path, "w", encoding="utf-8") as f:  # a live run: this test's parent process
    json.dump({"host": __import__("socket").gethostname(), "pid": os.getppid(), "heartbeat": 1e18}, f)
  with pytest.raises(checkpoints.WorkdirInUse, match=r"held by a running job .*run.lock"):
    evaluate.run_evaluate(cfg, setup["workdir"])
  os.remove(lock_path)
  os.makedirs(os.path.join(tmp_path, "stopped", "checkpoints", "100"))
  with pytest.raises(checkpoints.UserError, match=r"unfinished .*no generator/ yet.*--config.mode=distill"):
    evaluate.run_evaluate(cfg, str(tmp_path / "stopped"))


def test_unknown_evaluator_and_family_are_refused(tmp_path):
  setup = _no_models(tmp_path)
  cfg = _with_family(classes_evaluate_config(setup), "classes")
  cfg.evaluate.evaluators = "image_sets,fid50k"
  with pytest.raises(ValueError, match=r"'fid50k', which is not an evaluator; choose from image_sets, token_tv"):
    evaluate.run_evaluate(cfg, setup["workdir"])
  cfg = _with_family(classes_sample_config(setup), "llada")
  with pytest.raises(checkpoints.UserError, match=r"unknown config.family='llada'"):
    sample.run_sample(cfg, str(tmp_path))
