"""experiments/throughput.py at a tiny size: every row runs and the largest batch fits the budget."""
import pytest

from conftest import load_script

tp = load_script("throughput.py")


def test_options_are_checked():
  with pytest.raises(ValueError, match="--size"):
    tp.Options(size="huge").validate()
  with pytest.raises(ValueError, match="comma-separated"):
    tp.Options(size="tiny", teacher_steps="8,x").validate()
  with pytest.raises(ValueError, match=r"must be in \[1, 16\]"):
    tp.Options(size="tiny", teacher_steps="32").validate()
  with pytest.raises(ValueError, match="--batch"):
    tp.Options(size="tiny", batch=0).validate()
  assert tp.Options(size="full").resolved()["depth"] == 24
  assert tp.Options(size="full", depth=2).resolved()["depth"] == 2


def test_tiny_run_times_every_row_and_the_largest_batch(tmp_path):
  opts = tp.Options(size="tiny", batch=2, teacher_steps="2,3", max_batch=4, reps=1, warmup=0,
                    budget_gb=1.0, fast_compile=True, out=str(tmp_path), command="pytest")
  r = tp.run_throughput(opts)
  rows = {(row["sampler"], row["steps"], row["setting"]): row for row in r["rows"]}
  assert set(rows) == {(name, steps, setting) for name, steps in (("generator", 1), ("teacher", 2), ("teacher", 3))
                       for setting in ("batch 2", "largest that fits")}
  for row in r["rows"]:
    assert row["images_per_s"] > 0 and row["median_s"] > 0
    assert row["image_shape"][0] == row["batch"] and row["image_shape"][-1] == 3  # decoded pixels
    assert row["estimated_bytes"] is None or row["estimated_bytes"] <= r["budget_bytes"]
  assert rows[("generator", 1, "batch 2")]["generator_speedup"] == 1.0
  for key, found in r["largest_search"].items():
    assert found["batch"] == 4 and found["capped"], (key, found)  # a tiny model: the cap binds
  assert r["largest_search"]["teacher_3"]["reused_from_steps"] == 2  # the teacher's memory: no new search
  assert r["vqgan"]["decode_flops_per_image"] > 0 and r["decode_only"]["images_per_s"] > 0
  table = (tmp_path / "throughput.md").read_text()
  assert "| one-step generator | 2 |" in table and "| teacher, 2 steps | 4 (largest) |" in table
