"""The evaluator registry, its one writer and the one reader of ``config.sample`` (no network runs)."""
import json
import os

import ml_collections
import pytest

from dimo_jax.evaluation import evaluators, settings


def _config(**evaluate):
  return ml_collections.ConfigDict({"sample": {"steps": 8}, "evaluate": evaluate})


def test_names_default_to_the_family_and_unknown_ones_are_refused():
  classes = ("image_sets", "token_tv")
  assert evaluators.evaluator_names(_config(), "classes", classes) == classes
  assert evaluators.evaluator_names(_config(evaluators=""), "meissonic", ("t2i_export",)) == ("t2i_export",)
  assert evaluators.evaluator_names(_config(evaluators="token_tv, image_sets"), "classes", classes) == \
      ("token_tv", "image_sets")
  with pytest.raises(ValueError, match=r"'fid', which is not an evaluator; choose from image_sets"):
    evaluators.evaluator_names(_config(evaluators=["fid"]), "classes", classes)
  with pytest.raises(ValueError, match=r"config.family='llada' has no default evaluators"):
    evaluators.evaluator_names(_config(), "llada")


def test_rows_merge_by_name_and_one_writer(tmp_path):
  seen = []

  def first(req):
    seen.append(req.family)
    return evaluators.Result([{"name": "teacher_steps1", "steps": 1, "fid": 9.0}, {"name": "generator", "fid": 7.0}],
                             {"reference": "val"})

  def second(req):
    req.finish.append(lambda results: results.update(ratio=results["rows"][1]["fid"] / results["rows"][0]["fid"]))
    return evaluators.Result([{"name": "generator", "tv_seq": 0.25}, {"name": "real", "tv_seq": 0.1}])

  req = evaluators.Request(_config(), str(tmp_path), str(tmp_path / "eval"), "classes")
  results = evaluators.evaluate(req, ["image_sets", "token_tv"], {"image_sets": first, "token_tv": second})
  assert seen == ["classes"]
  assert results["rows"] == [{"name": "teacher_steps1", "steps": 1, "fid": 9.0},
                             {"name": "generator", "fid": 7.0, "tv_seq": 0.25}, {"name": "real", "tv_seq": 0.1}]
  assert results["ratio"] == pytest.approx(7.0 / 9.0) and results["reference"] == "val"
  stored = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert stored["rows"] == results["rows"] and stored["evaluators"] == ["image_sets", "token_tv"]
  table = (tmp_path / "eval" / "table.md").read_text().splitlines()
  assert table[0] == "| name | steps | fid | tv_seq |"
  assert table[3] == "| generator | - | 7 | 0.25 |"
  assert not [f for f in os.listdir(tmp_path / "eval") if f.startswith(".tmp")]


def test_one_reader_of_the_sampler_settings():
  sp = settings.sampler_settings_from_config(ml_collections.ConfigDict({"sample": {"steps": 8, "guidance": 2}}))
  assert (sp.steps, sp.guidance, sp.temperature, sp.batch_size, sp.seed) == (8, 2.0, None, 0, 0)
  assert sp.teacher_kwargs()["temperature"] == 1.0
  assert settings.sampler_settings_from_config(ml_collections.ConfigDict({"sample": {}})).steps == settings.DEFAULT_STEPS
  assert settings.sampler_settings_from_config({"sampler": "ancestral"}, steps=3).steps == 3
  with pytest.raises(ValueError, match=r"config.sample.steps must be >= 1, got 0"):
    settings.sampler_settings_from_config({"steps": 0})
  with pytest.raises(ValueError, match=r"config.sample.batch_size must be >= 1, got 0"):
    settings.sampler_settings_from_config({"batch_size": 0})


def test_the_writer_draws_the_quality_plot_where_rows_have_steps(tmp_path):
  rows = [{"name": "teacher_steps4", "model": "teacher", "sampler": "confidence", "steps": 4, "fid": 9.0,
           "ms_per_sample": 2.0},
          {"name": "teacher_steps8", "model": "teacher", "sampler": "confidence", "steps": 8, "fid": 7.0,
           "ms_per_sample": 4.0},
          {"name": "generator", "model": "generator", "steps": 1, "fid": 7.5, "ms_per_sample": 0.5}]
  files = evaluators.write_results(str(tmp_path), {"rows": rows}, "| table |")
  assert files["plot"] == str(tmp_path / "quality.png")
  assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((tmp_path / "results.json").read_text())["files"]["plot"] == files["plot"]
  # an export of images for external scorers holds no metric against steps: no plot, no error
  out = tmp_path / "export"
  out.mkdir()
  files = evaluators.write_results(str(out), {"rows": [{"name": "hps_v2", "images": 8}]}, "| table |")
  assert "plot" not in files and not (out / "quality.png").exists()
