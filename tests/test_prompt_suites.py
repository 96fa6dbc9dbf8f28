"""Text-to-image benchmark outputs at tiny size (``mode=evaluate`` with ``configs/meissonic.py``)
and one-step sampling from a distilled generator (``mode=sample`` with
``config.sample.generator``): the HPS v2 and GenEval folder layouts the official scorers read,
GenEval's seed reset per prompt, resuming, the errors for bad prompt files, and the generator's
draw against ``core.samplers.one_step_cond_sampler`` called directly. The tiny converted
networks and tokenizer are ``test_sample_text``'s."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from test_sample_text import TRANSFORMER, _config, _random_params, release  # noqa: F401 (fixture)

from dimo_jax import main
from dimo_jax.core import samplers
from dimo_jax.evaluation import prompt_suites as ps
from dimo_jax.evaluation import text_to_image as sample_text
from dimo_jax.modes import sample
from dimo_jax.networks import conditioning, meissonic
from dimo_jax.storage import checkpoints

HPS = {"anime": ["a cat on a mat", "a cat"], "concept-art": ["sat on a cat"],
       "paintings": ["a mat"], "photo": ["a cat sat", "on a mat", "cat"]}
GENEVAL = ['{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}',
           '{"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "blue"}], "prompt": "a photo of a blue cat"}',
           '{"tag": "counting", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}']


def _hps_folder(root, prompts=HPS):
  os.makedirs(root, exist_ok=True)
  for style, lines in prompts.items():
    with open(os.path.join(root, f"{style}.json"), "w") as f:
      json.dump(lines, f)
  return str(root)


def _eval_config(release, output, **evaluate):  # noqa: F811
  c = _config(release, "", steps=2, batch_size=2)
  c.mode = "evaluate"
  c.evaluate.output = str(output)
  c.evaluate.update(evaluate)
  return c


def _pixels(path):
  return np.asarray(Image.open(path))


def test_hps_layout(release, tmp_path):  # noqa: F811
  prompts = _hps_folder(tmp_path / "benchmark")
  out = tmp_path / "eval"
  res = main.run(_eval_config(release, out, suite="hps", hps_prompts=prompts), str(tmp_path / "w"))["t2i"]
  assert res["written"] == 7 and res["skipped"] == 0
  # hpsv2.evaluate takes every entry of the folder for a style: the four folders and nothing else.
  assert sorted(os.listdir(out / "hps")) == sorted(ps.HPS_STYLES)
  for style, lines in HPS.items():
    assert sorted(os.listdir(out / "hps" / style)) == [f"{i:05d}.jpg" for i in range(len(lines))]
    with Image.open(out / "hps" / style / "00000.jpg") as im:
      assert im.format == "JPEG" and im.size == (32, 32)
  settings = json.loads((out / "settings.json").read_text())
  assert settings["sampler"]["model"] == "teacher" and settings["sampler"]["steps"] == 2
  assert settings["suites"]["hps"]["num_prompts"] == {s: len(v) for s, v in HPS.items()}
  hps_dir = str(out / "hps")
  assert res["commands"][0] == f"python -c \"import hpsv2; hpsv2.evaluate('{hps_dir}', hps_version='v2.0')\""
  assert f"data_path='{prompts}'" in res["commands"][1]
  assert not np.array_equal(_pixels(out / "hps" / "anime" / "00000.jpg"),
                            _pixels(out / "hps" / "anime" / "00001.jpg"))


def test_geneval_layout_seed_reset_and_resume(release, tmp_path):  # noqa: F811
  metadata = tmp_path / "evaluation_metadata.jsonl"
  metadata.write_text("\n".join(GENEVAL) + "\n\n", encoding="utf-8")
  out = tmp_path / "eval"
  generator = str(release / "transformer")  # a converted folder, as a released generator's
  cfg = _eval_config(release, out, suite="geneval", geneval_metadata=str(metadata))
  cfg.sample.generator = generator
  res = main.run(cfg, str(tmp_path / "w"))["t2i"]
  assert res["written"] == 12
  folder = out / "geneval"
  assert sorted(os.listdir(folder)) == ["00000", "00001", "00002"]
  for i, line in enumerate(GENEVAL):
    assert (folder / f"{i:05d}" / "metadata.jsonl").read_text(encoding="utf-8") == line
    assert sorted(os.listdir(folder / f"{i:05d}" / "samples")) == [f"{k:04d}.png" for k in range(4)]
  images = {(i, k): _pixels(folder / f"{i:05d}" / "samples" / f"{k:04d}.png")
            for i in range(3) for k in range(4)}
  # The seed is reset per prompt: prompts 0 and 2 are the same text, so their samples are equal;
  # the four samples of one prompt differ.
  for k in range(4):
    np.testing.assert_array_equal(images[(0, k)], images[(2, k)])
  assert not np.array_equal(images[(0, 0)], images[(0, 1)])
  assert not np.array_equal(images[(0, 0)], images[(1, 0)])
  settings = json.loads((out / "settings.json").read_text())
  assert settings["sampler"]["model"] == "generator" and settings["sampler"]["r_init"] == 0.5
  assert res["commands"][0].startswith(f"python evaluation/evaluate_images.py {folder} --outfile ")
  assert res["commands"][1].startswith("python evaluation/summary_scores.py ")

  # Resume: a deleted sample is drawn again, identically; the others are not touched.
  os.remove(folder / "00001" / "samples" / "0002.png")
  kept = folder / "00000" / "samples" / "0000.png"
  stamp = os.stat(kept).st_mtime_ns
  res = main.run(cfg, str(tmp_path / "w"))["t2i"]
  assert (res["written"], res["skipped"]) == (1, 11)
  np.testing.assert_array_equal(_pixels(folder / "00001" / "samples" / "0002.png"), images[(1, 2)])
  assert os.stat(kept).st_mtime_ns == stamp
  assert not [n for n in os.listdir(folder / "00001" / "samples") if n.startswith(".tmp")]

  # A rerun from scratch at another batch size draws the same images.
  again = _eval_config(release, tmp_path / "again", suite="geneval", geneval_metadata=str(metadata),
                       max_prompts=2)
  again.sample.generator = generator
  again.sample.batch_size = 3
  main.run(again, str(tmp_path / "w"))
  for i in range(2):
    for k in range(4):
      np.testing.assert_array_equal(
          _pixels(tmp_path / "again" / "geneval" / f"{i:05d}" / "samples" / f"{k:04d}.png"), images[(i, k)])

  # Other sampler settings into the same folder are refused.
  cfg.sample.one_step.r_init = 0.6
  with pytest.raises(ValueError, match=r"settings.json was written with other settings \(r_init\)"):
    main.run(cfg, str(tmp_path / "w"))


def test_one_step_generator_matches_core(release, tmp_path):  # noqa: F811
  key = jax.random.PRNGKey(5)
  params = _random_params(lambda: meissonic.init_params(TRANSFORMER, key, text_len=16), 10)
  ema = _random_params(lambda: meissonic.init_params(TRANSFORMER, key, text_len=16), 11)
  workdir = tmp_path / "dimo"
  checkpoints.save_params(str(workdir / "generator"), params,
                          {"meissonic_config": TRANSFORMER.to_dict(), "role": "generator"},
                          ema_params=ema, step=3)
  prompts = ["a cat on a mat", "sat on a cat", "a mat"]
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
  cfg = _config(release, prompts_file, seed=3, generator=str(workdir))  # the workdir is accepted
  cfg.sample.one_step.update(r_init=0.6, sigma=0.1, temperature=1.2)
  out = main.run(cfg, str(tmp_path / "w"))
  settings = json.loads((tmp_path / "w" / "samples" / "settings.json").read_text())
  assert (settings["model"], settings["steps"], settings["r_init"], settings["sigma"],
          settings["gen_temperature"]) == ("generator", 1, 0.6, 0.1, 1.2)
  assert settings["generator"] == str(workdir / "generator")

  # The EMA parameters, and each row as one_step_text_sample draws it alone.
  settings = sample_text.read_settings(cfg, str(tmp_path / "w"))
  nets = sample_text.load_networks(cfg, 32, settings.generator)
  leaf = lambda tree: np.asarray(jax.tree_util.tree_leaves(tree)[0])  # noqa: E731
  np.testing.assert_array_equal(leaf(nets.transformer_params), leaf(ema))
  enc = sample_text.encode_prompts(nets, prompts, 3)
  cond = {**enc, "micro": np.broadcast_to(np.asarray(settings.micro_conds, np.float32), (3, 5))}
  tcfg = nets.transformer.config
  apply_fn = conditioning.make_apply_fn(nets.transformer, conditions=True)
  direct = [np.asarray(samplers.one_step_cond_sampler(
      apply_fn, nets.transformer_params, jax.random.PRNGKey(3 + i), {k: v[i:i + 1] for k, v in cond.items()},
      seq_len=tcfg.seq_len, mask_id=tcfg.mask_id, codebook_size=tcfg.codebook_size, r_init=0.6,
      noise_sigma=0.1, temperature=1.2))[0] for i in range(3)]
  np.testing.assert_array_equal(sample_text.draw_tokens(nets, settings, cond, None, [3, 4, 5]),
                                np.stack(direct))
  decode = sample_text.make_decoder(nets)
  for i, path in enumerate(out["images"]):
    expected = np.round(np.clip(decode(direct[i]), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(_pixels(path), expected)

  assert sample_text.resolve_generator(str(release / "transformer"))[0] == "converted"
  with pytest.raises(FileNotFoundError, match="holds no generator; point --config.sample.generator"):
    sample_text.resolve_generator(str(tmp_path))


def test_bad_prompt_files(release, tmp_path):  # noqa: F811
  partial = _hps_folder(tmp_path / "partial", {"anime": ["a cat"]})
  with pytest.raises(FileNotFoundError, match=r"partial/concept-art.json is missing .*zhwang/HPDv2"):
    main.run(_eval_config(release, tmp_path / "o", suite="hps", hps_prompts=partial), str(tmp_path))
  empty_style = _hps_folder(tmp_path / "empty", {**HPS, "photo": []})
  with pytest.raises(ValueError, match=r"empty/photo.json is empty"):
    ps.read_hps_prompts(empty_style)
  _hps_folder(tmp_path / "bad", HPS)
  (tmp_path / "bad" / "paintings.json").write_text('[\n"a cat",\n"a mat"\n')
  with pytest.raises(ValueError, match=r"bad/paintings.json, line 4: not valid JSON"):
    ps.read_hps_prompts(str(tmp_path / "bad"))
  (tmp_path / "bad" / "paintings.json").write_text('["a cat", 3]')
  with pytest.raises(ValueError, match=r"paintings.json, item 1: 3 is not a non-empty prompt"):
    ps.read_hps_prompts(str(tmp_path / "bad"))

  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n \n")
  with pytest.raises(ValueError, match=r"empty.jsonl is empty \(no JSON line\); GenEval's prompts"):
    main.run(_eval_config(release, tmp_path / "o", suite="geneval", geneval_metadata=str(empty)),
             str(tmp_path))
  broken = tmp_path / "broken.jsonl"
  broken.write_text(GENEVAL[0] + "\n" + GENEVAL[1][:-1] + "\n")
  with pytest.raises(ValueError, match=r"broken.jsonl, line 2: not valid JSON"):
    ps.read_geneval_metadata(str(broken))
  broken.write_text('{"tag": "colors", "text": "a cat"}\n')
  with pytest.raises(ValueError, match=r"broken.jsonl, line 1: no 'prompt' string"):
    ps.read_geneval_metadata(str(broken))
  with pytest.raises(FileNotFoundError, match=r"absent.jsonl' not found; GenEval's prompts"):
    ps.read_geneval_metadata(str(tmp_path / "absent.jsonl"))
  with pytest.raises(ValueError, match="config.evaluate.hps_prompts is not set"):
    main.run(_eval_config(release, tmp_path / "o", suite="hps"), str(tmp_path))
  with pytest.raises(ValueError, match="config.evaluate.suite='coco'"):
    main.run(_eval_config(release, tmp_path / "o", suite="coco"), str(tmp_path))
  assert sample.family_of(_eval_config(release, tmp_path / "o")) == "meissonic"

  # The layouts, as the scorers name them.
  assert ps.hps_image_path("o", "photo", 7) == os.path.join("o", "photo", "00007.jpg")
  assert ps.geneval_metadata_path("o", 12) == os.path.join("o", "00012", "metadata.jsonl")
  assert ps.geneval_sample_path("o", 12, 3) == os.path.join("o", "00012", "samples", "0003.png")


def test_prompt_suite_files_read_as_utf8(tmp_path):
  folder = _hps_folder(tmp_path / "hps", HPS)
  anime = os.path.join(folder, "anime.json")
  with open(anime, "wb") as f:
    f.write(b"\xef\xbb\xbf" + json.dumps(HPS["anime"]).encode())
  assert ps.read_hps_prompts(folder)["anime"] == HPS["anime"]
  with open(anime, "wb") as f:
    f.write(json.dumps(["a caf\xe9"], ensure_ascii=False).encode("latin-1"))
  with pytest.raises(checkpoints.UserError, match=r"anime.json, line 1: not UTF-8 text \(byte 0xe9 at offset 7\); "
                     "save the file as UTF-8; the HPS v2 prompt files are JSON lists of strings"):
    ps.read_hps_prompts(folder)
  meta = tmp_path / "evaluation_metadata.jsonl"
  lines = [json.dumps({"tag": "single_object", "prompt": p}, ensure_ascii=False)  # U+2028 stays inside its line
           for p in ("a photo of a cat", "a photo of a\u2028dog")]
  meta.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
  read = ps.read_geneval_metadata(str(meta))
  assert [r.prompt for r in read] == ["a photo of a cat", "a photo of a\u2028dog"] and read[0].line == lines[0]
  meta.write_bytes(lines[0].encode() + b"\n\x80\n")
  with pytest.raises(checkpoints.UserError, match=r"evaluation_metadata.jsonl, line 2: not UTF-8 text"):
    ps.read_geneval_metadata(str(meta))
