"""The captioned-digits text-to-image path at tiny size, end to end through ``dimo_jax.main``."""
import json
import os

import numpy as np
import pytest

from configs import captioned_digits
from dimo_jax import main
from dimo_jax.data import captions


def test_captions_tokenizer_and_split():
  assert captions.caption_text(captions.caption_id(7, 1, 1)) == "a thick slanted seven"
  assert captions.caption_text(captions.caption_id(8, 0, 2)) == "an upright eight"
  assert captions.caption_text(0) == ""
  ids = captions.word_tokenizer().encode(["a thin two", ""])
  assert ids.shape == (2, captions.MAX_LENGTH) and (ids[:, 0] == captions.VOCAB.index("<|startoftext|>")).all()
  held, seen = set(captions.held_out_prompts().tolist()), set(captions.distill_prompts().tolist())
  assert len(held) == 10 and len(seen) == 30 and not held & seen
  every = set(captions.distill_prompts("all").tolist())
  assert len(every) == 80 and seen <= every and not held & every and 0 not in every
  partial = [captions.caption_parts(c) for c in every - seen]
  assert all(t == 0 or s == 0 for _, t, s in partial)
  with pytest.raises(ValueError, match="config.distill.prompt_set='some'"):
    captions.distill_prompts("some")


def test_captioned_digits_pipeline_tiny(tmp_path):
  cfg = captioned_digits.get_config()
  cfg.model.num_layers = 1
  cfg.model.num_single_layers = 1
  cfg.train.steps = 3
  cfg.train.batch_size = 8
  cfg.train.warmup_steps = 1
  cfg.distill.steps = 2
  cfg.distill.batch_size = 8
  cfg.distill.aux_updates = 1
  cfg.distill.warmup_steps = 0
  cfg.distill.log_every = 1
  cfg.evaluate.per_prompt = 2
  cfg.evaluate.teacher_steps = (1, 2)
  workdir = str(tmp_path / "run")
  out = main.run(cfg, workdir)
  assert out["step"] == 2 and np.isfinite(out["gen/grad_norm"])
  table = open(os.path.join(workdir, "eval", "table.md")).read()
  assert "Di[M]O generator" in table and "held-out" in table
  rows = json.load(open(os.path.join(workdir, "eval", "results.json")))["rows"]
  assert [r["steps"] for r in rows] == [0, 1, 2, 1]
  assert os.path.isdir(os.path.join(workdir, "teacher")) and os.path.isdir(os.path.join(workdir, "generator"))
  _sample_teacher_and_generator(cfg, workdir, tmp_path)


def _sample_teacher_and_generator(cfg, workdir, tmp_path):
  """``mode=sample`` on the finished run: the teacher's grids of the seen and held-out prompt sets,
  then the generator's of a prompt file; the tokens decode to the grids, the index names each row."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from dimo_jax.data import image_grids  # pylint: disable=import-outside-toplevel
  cfg.mode = "sample"
  cfg.sample.steps, cfg.sample.per_prompt = 2, 2
  out = main.run(cfg, workdir)
  assert set(out["grids"]) == {"seen", "held_out"} and out["num"] == 2 * (30 + 10)
  index = json.load(open(out["index"]))
  assert index["model"] == "teacher" and index["steps"] == 2 and index["guidance"] == cfg.teacher.guidance
  held = index["sets"]["held_out"]
  assert [r["caption_id"] for r in held["rows"]] == captions.held_out_prompts().tolist()
  assert held["rows"][0]["prompt"] == captions.caption_text(captions.held_out_prompts()[0])
  tokens = np.load(os.path.join(out["output"], held["tokens"]))
  assert tokens.shape == (20, 64) and tokens.min() >= 0 and tokens.max() < 17
  grid = np.asarray(Image.open(out["grids"]["held_out"]).convert("L"))
  assert grid.shape == (10 * 8 * 4, 2 * 8 * 4)  # a row per prompt, per_prompt columns, 4x scale
  first = image_grids.tokens_to_images(tokens[:1], 17, (8, 8))[0]
  np.testing.assert_allclose(grid[:32:4, :32:4] / 255.0, first, atol=1 / 255 + 1e-6)

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a thick slanted seven\nan upright four\n")
  cfg.sample.model, cfg.sample.prompts, cfg.sample.output = "generator", str(prompts), str(tmp_path / "gen")
  out = main.run(cfg, workdir)
  index = json.load(open(out["index"]))
  assert index["model"] == "generator" and index["steps"] == 1 and list(index["sets"]) == ["prompts"]
  assert [r["prompt"] for r in index["sets"]["prompts"]["rows"]] == ["a thick slanted seven", "an upright four"]
  assert np.load(os.path.join(out["output"], "prompts.npy")).shape == (4, 64)
  prompts.write_text("a thick slanted seven\na purple seven\n")
  with pytest.raises(ValueError, match=r"prompt 2 'a purple seven' is not a caption"):
    main.run(cfg, workdir)


def test_goal_note_known_answer():
  from dimo_jax.evaluation import prompt_following  # pylint: disable=import-outside-toplevel
  score = lambda acc, fd: {"seen": {"prompt_acc": acc, "fd_pixel": fd, "samples": 100}}
  rows = [{"model": "teacher (Meissonic sampler)", "steps": 1, "scores": score(80.0, 150.0)},
          {"model": "teacher (Meissonic sampler)", "steps": 16, "scores": score(90.0, 100.0)},
          {"model": "Di[M]O generator", "steps": 1, "scores": score(85.0, 110.0)}]
  note = prompt_following.goal_note(rows, "seen")
  # sqrt(0.85 * 0.15 / 100) = 3.57 points; best accuracy 90 (16 steps), best FD 100 (16 steps).
  assert "85.0% (standard error 3.6) against the teacher's best 90.0% (-5.0 points)" in note
  assert "FD-pixel 110.0 = 1.10x the teacher's best 100.0" in note
