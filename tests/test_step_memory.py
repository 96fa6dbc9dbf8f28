"""experiments/step_memory.py: XLA's memory analysis of the step, per remat policy."""
import json
import os

import pytest
from conftest import load_script

from configs import maskgit

sm = load_script("step_memory.py")


def tiny_config():
  c = maskgit.get_config("1")
  c.model.depth, c.model.width, c.model.heads = 2, 32, 2
  c.data.vocab_size, c.data.seq_len, c.data.num_classes = 32, 16, 4
  c.data.image_shape = (4, 4)
  c.distill.batch_size = 4
  return c


def test_rematerialisation_shrinks_temporaries_and_state_is_the_arguments(tmp_path):
  record = sm.run(tiny_config(), ["none", "full"], batch=8, budget_gb=1.0, out=str(tmp_path))
  none, full = record["rows"]
  assert none["batch"] == full["batch"] == 8
  # The donated state is the step's arguments (up to the key's byte layout), and both policies
  # carry the same state.
  assert none["state_bytes"] == full["state_bytes"]
  assert abs(none["argument_size_in_bytes"] - none["state_bytes"]) < 1024
  assert none["estimated_bytes"] == (none["argument_size_in_bytes"] + none["output_size_in_bytes"]
                                     - none["alias_size_in_bytes"] + none["temp_size_in_bytes"])
  # Full rematerialisation keeps only the layer inputs for the backward passes.
  assert 0 < full["temp_size_in_bytes"] < none["temp_size_in_bytes"]
  saved = json.load(open(os.path.join(tmp_path, "step_memory.json")))
  assert [r["remat"] for r in saved["rows"]] == ["none", "full"]
  table = open(os.path.join(tmp_path, "step_memory.md")).read()
  assert "| none |" in table and "| full |" in table and "within 1 GB" in table and "| yes |" in table


@pytest.mark.parametrize("text", ["", "none,some", "fast"])
def test_bad_policy_names_fail_naming_the_flag(text):
  with pytest.raises(ValueError, match="--remat"):
    sm.parse_policies(text)


def test_parse_policies_keeps_order():
  assert list(sm.parse_policies(" full, none ,dots")) == ["full", "none", "dots"]


def test_parse_levers_fills_defaults_and_keeps_labels():
  rows = sm.parse_levers("base, remat=none+attention=xla_saved,teacher_dtype=bfloat16")
  assert [r["label"] for r in rows] == ["base", "remat=none+attention=xla_saved", "teacher_dtype=bfloat16"]
  assert {k: rows[0][k] for k in sm.LEVER_DEFAULTS} == sm.LEVER_DEFAULTS
  assert (rows[1]["remat"], rows[1]["attention"], rows[1]["donate"]) == ("none", "xla_saved", "1")
  assert rows[2]["teacher_dtype"] == "bfloat16" and rows[2]["remat"] == ""


@pytest.mark.parametrize("text", ["", "remat=fast", "attention", "speed=1", "base+donate=2"])
def test_bad_levers_fail_naming_the_flag(text):
  with pytest.raises(ValueError, match="--levers"):
    sm.parse_levers(text)


def test_host_round_trips_are_found_in_the_compiled_program():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def with_callback(x):
    jax.debug.callback(lambda v: None, x)
    return x * 2

  x = jnp.ones(3)
  assert sm.host_round_trips(jax.jit(lambda v: v * 2).lower(x).compile()) == 0
  assert sm.host_round_trips(jax.jit(with_callback).lower(x).compile()) == 1
