"""Records what the per-family modes of commit 8f740a6 produced at tiny size into
``tests/data/one_path_golden.json`` (read by ``tests/test_same_outputs.py``).

It ran once, at that commit, with ``JAX_PLATFORMS=cpu python -m pytest -q -p no:cacheprovider
tests/data/make_one_path_golden.py``: the modules it calls (``modes.sample_text``,
``modes.evaluate_text``, ``modes.distill_text.evaluate_captioned``, ``core.meissonic_sampler``)
are gone since; it is kept as the record of how the golden values were made.
"""
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import one_path_cases as cases  # noqa: E402
from test_sample_text import release  # noqa: E402,F401 (fixture)

GOLDEN = {}


def test_classes(tmp_path):
  from dimo_jax.modes import evaluate, sample  # pylint: disable=import-outside-toplevel
  setup = cases.classes_setup(tmp_path)
  out = {}
  for name, kw in {"teacher_confidence": {}, "teacher_ancestral": {"sampler": "ancestral", "labels": "2,0"},
                   "generator": {"model": "generator", "checkpoint": setup["workdir"]}}.items():
    res = sample.run_sample(cases.classes_sample_config(setup, output=str(tmp_path / f"{name}.npy"), **kw),
                            str(tmp_path))
    out[name] = {"tokens": np.load(res["tokens"]).tolist(), "labels": np.load(res["labels"]).tolist()}
  results = evaluate.run_evaluate(cases.classes_evaluate_config(setup), setup["workdir"])
  out["evaluate_rows"] = cases.comparable_rows(results["rows"])
  GOLDEN["classes"] = json.loads(json.dumps(out, default=float))


def test_meissonic(release, tmp_path):  # noqa: F811
  from dimo_jax.core import meissonic_sampler as ms  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import evaluate_text, sample_text  # pylint: disable=import-outside-toplevel
  prompts = cases.write_prompts(tmp_path)
  cfg = cases.meissonic_config(release, prompts)
  res = sample_text.run(cfg, str(tmp_path / "w"))
  out = {"teacher_images": {os.path.basename(p): cases.pixels_sha1(p) for p in res["images"]},
         "teacher_index": [json.loads(line) for line in open(res["index"], encoding="utf-8")]}
  # The one-step draw: x_init and tokens per row, with the converted transformer as the generator.
  gen_cfg = cases.meissonic_config(release, prompts, generator=str(release / "transformer"))
  settings = sample_text.read_settings(gen_cfg, str(tmp_path / "g"))
  nets = sample_text.load_networks(gen_cfg, 32, settings.generator)
  enc = sample_text.encode_prompts(nets, cases.PROMPTS, 3)
  cond = {**enc, "micro": np.broadcast_to(np.asarray(settings.micro_conds, np.float32), (3, 5))}
  tcfg = nets.transformer.config
  apply_fn = ms.model_apply_fn(nets.transformer)
  rows = []
  for i in range(3):
    tokens, x_init = ms.one_step_text_sample(
        apply_fn, nets.transformer_params, jax.random.PRNGKey(7 + i), {k: v[i:i + 1] for k, v in cond.items()},
        seq_len=tcfg.seq_len, mask_id=tcfg.mask_id, codebook_size=tcfg.codebook_size, r_init=0.5,
        noise_sigma=0.3, temperature=1.0, return_init=True)
    rows.append({"x_init": np.asarray(x_init)[0].tolist(), "tokens": np.asarray(tokens)[0].tolist()})
  out["generator_rows"] = rows
  ecfg = cases.meissonic_config(release, "", steps=2)
  ecfg.mode = "evaluate"
  ecfg.evaluate.update(suite="hps", hps_prompts=cases.write_hps(tmp_path / "hps_prompts"),
                       hps_styles=tuple(cases.HPS), output=str(tmp_path / "t2i"))
  res = evaluate_text.run_text_evaluate(ecfg, str(tmp_path / "w"))
  hps = tmp_path / "t2i" / "hps"
  out["hps_images"] = {f"{s}/{f}": cases.pixels_sha1(hps / s / f) for s in sorted(os.listdir(hps))
                       for f in sorted(os.listdir(hps / s))}
  out["hps_written"] = res["written"]
  GOLDEN["meissonic"] = out


def test_captioned(tmp_path):
  from dimo_jax.modes import distill_text  # pylint: disable=import-outside-toplevel
  cfg = cases.captioned_config()
  cases.captioned_setup(tmp_path, cfg)
  distill_text.evaluate_captioned(cfg, str(tmp_path))
  with open(tmp_path / "eval" / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  GOLDEN["captioned_digits"] = {"rows": cases.comparable_rows(results["rows"]),
                                "table": open(tmp_path / "eval" / "table.md", encoding="utf-8").read()}


def test_write():
  assert set(GOLDEN) == {"classes", "meissonic", "captioned_digits"}
  GOLDEN["commit"] = "8f740a6"
  with open(cases.GOLDEN, "w", encoding="utf-8") as f:
    json.dump(GOLDEN, f, indent=1, sort_keys=True)
    f.write("\n")
