"""The k-step generator: its schedule, its sampling loop and Di[M]O's backward-simulation step."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill import K, L, tiny_setup

from dimo_jax.core import generator_steps as gs
from dimo_jax.core import masking, samplers
from dimo_jax.method import dimo


def test_step_ratios_known_answers():
  np.testing.assert_allclose(gs.step_ratios("linear", 4, 0.6), [0.6, 0.45, 0.3, 0.15], rtol=1e-6)
  np.testing.assert_allclose(gs.step_ratios("square", 3, 0.6), [0.6, 0.6 * (2 / 3) ** 2, 0.6 * (1 / 3) ** 2],
                             rtol=1e-6)
  np.testing.assert_allclose(gs.step_ratios((0.4, 0.1), 3, 0.6), [0.6, 0.4, 0.1], rtol=1e-6)
  per_example = gs.step_ratios("linear", 2, jnp.array([0.5, 1.0]))
  np.testing.assert_allclose(per_example, [[0.5, 1.0], [0.25, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(gs.step_ratios("linear", 1, 0.6), [0.6])


@pytest.mark.parametrize("schedule, steps, match", [
    ("zigzag", 2, "generator_schedule='zigzag' is not valid"),
    ((0.3,), 3, "has 1 ratios; 3 generator steps need 2"),
    ((0.2, 0.3), 3, "strictly decreasing"),
    ((1.0,), 2, "strictly decreasing ratios in \\(0, 1\\)"),
    ("linear", 0, "generator_steps must be an int >= 1"),
])
def test_bad_schedules_fail_naming_the_key(schedule, steps, match):
  with pytest.raises(ValueError, match=match):
    gs.check_schedule(schedule, steps)
  with pytest.raises(ValueError, match="config.distill.generator_"):
    dimo.DistillSettings(generator_steps=steps, generator_schedule=schedule)


def test_remask_masks_exact_counts_and_keeps_the_rest():
  tokens = jax.random.randint(jax.random.key(0), (5, 10), 0, K)
  out = gs.remask(jax.random.key(1), tokens, jnp.array([0.0, 0.1, 0.33, 0.5, 1.0]), K)
  np.testing.assert_array_equal(np.sum(np.asarray(out) == K, 1), [0, 1, 3, 5, 10])
  visible = np.asarray(out) != K
  np.testing.assert_array_equal(np.asarray(out)[visible], np.asarray(tokens)[visible])


@pytest.fixture(scope="module")
def generator():
  _, model, _, state = tiny_setup()
  return model, state.gen.params


def test_one_step_generate_is_the_one_step_generator(generator):
  model, params = generator
  labels = jnp.arange(7) % 3
  for key in (jax.random.key(0), jax.random.key(5)):
    one = samplers.one_step_generate(model, params, key, labels, r_init=0.6, sigma=0.1)
    k1 = gs.generate(gs.model_apply_fn(model, 0.1), params, key, labels, steps=1, seq_len=L, codebook_size=K)
    np.testing.assert_array_equal(one, k1)


def test_jitted_generate_equals_an_unrolled_loop(generator):
  """Three steps under jax.jit equal a plain Python loop over the documented keys and ratios."""
  model, params = generator
  labels = jnp.arange(16) % 3
  key = jax.random.key(3)
  run = jax.jit(lambda p, k: gs.generate(gs.model_apply_fn(model, 0.1), p, k, labels, steps=3, schedule="cosine",
                                         seq_len=L, codebook_size=K, r_init=0.6))
  got = np.asarray(run(params, key))

  k_x, k_noise, k_draw = jax.random.split(key, 3)
  x = masking.make_x_init(k_x, 16, L, K, 0.6)
  ratios = [0.6, 0.6 * np.sin(np.pi / 2 * 2 / 3), 0.6 * np.sin(np.pi / 2 * 1 / 3)]
  y = None  # the previous step's output
  for j in range(3):
    if j:
      k_mask, k_noise, k_draw = jax.random.split(jax.random.fold_in(key, j), 3)
      x = gs.remask(k_mask, y, ratios[j], K)
      assert int(jnp.sum(x == K)) == 16 * round(L * ratios[j])
    logits = model.apply({"params": params}, x, labels, deterministic=True, noise_sigma=0.1, rngs={"noise": k_noise})
    y = jax.random.categorical(k_draw, logits[..., :K], axis=-1)
  np.testing.assert_array_equal(got, np.asarray(y))
  assert got.min() >= 0 and got.max() < K


def test_backward_simulation_builds_each_drawn_steps_input():
  """With a near-greedy draw and no embedding noise, an example drawn at step 1 reads step 0's
  argmax with exactly round(L t_1) positions re-masked; one drawn at step 0 reads x_init."""
  _, _, dist, state = tiny_setup(generator_steps=2, gen_temp=1e-4)
  labels, x_init = dist.draw_inputs(jax.random.key(2), 8)
  inputs, select = dist.simulate_inputs(state.gen.params, x_init, labels, jax.random.key(4), 0.0)
  inputs, select = np.asarray(inputs), np.asarray(select)
  assert set(select.tolist()) == {0, 1}
  greedy = np.asarray(jnp.argmax(dist.gen_logits(state.gen.params, x_init, labels, jax.random.key(9), 0.0)[..., :K], -1))
  r0 = round(L * 0.6) / L  # x_init's own mask ratio; linear schedule, 2 steps: t_1 = r0 / 2
  for b in range(8):
    if select[b] == 0:
      np.testing.assert_array_equal(inputs[b], np.asarray(x_init)[b])
      continue
    visible = inputs[b] != K
    assert (~visible).sum() == round(L * r0 / 2)
    np.testing.assert_array_equal(inputs[b][visible], greedy[b][visible])


def test_gradient_is_the_drawn_steps_surrogate_gradient():
  """The step's gradient equals autodiff of the surrogate 0.5 |z - sg(z - g)|^2 of the drawn step's
  output, whose input the earlier steps make from stop-gradiented parameters inside the
  differentiated function; it is not the gradient at x_init."""
  _, _, dist, state = tiny_setup(generator_steps=3, generator_schedule="linear")
  # An auxiliary apart from the teacher, so that the token gradient g is not zero.
  state = state.replace(aux=state.aux.replace(params=jax.tree_util.tree_map(lambda a: a * 1.1, state.aux.params)))
  key = jax.random.key(6)
  grads, _, parts = jax.jit(dist.generator_gradient)(state, key)
  keys = jax.random.split(key, 7)  # generator_gradient's keys: 0 inputs, 1 forward, 6 simulation
  sigma = dist.sigma_at(state.step)
  labels, x_init = dist.draw_inputs(keys[0], dist.s.batch_size)
  g = parts["g"]
  assert float(jnp.max(jnp.abs(g))) > 1e-4

  def surrogate(p, simulate=True):
    inputs = dist.simulate_inputs(jax.lax.stop_gradient(p), x_init, labels, keys[6], sigma)[0] if simulate else x_init
    z = dist.gen_logits(p, inputs, labels, keys[1], sigma)
    return 0.5 * jnp.sum(jnp.square(z - jax.lax.stop_gradient(z - g)))

  ref = jax.grad(surrogate)(state.gen.params)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  select = np.asarray(dist.simulate_inputs(state.gen.params, x_init, labels, keys[6], sigma)[1])
  assert select.max() > 0  # some examples train a later step
  at_init = jax.grad(lambda p: surrogate(p, simulate=False))(state.gen.params)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(grads),
                                                            jax.tree_util.tree_leaves(at_init)))
  scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(grads))
  assert gap > 1e-3 * scale > 0


def test_one_generator_step_is_todays_step_and_two_differ():
  """generator_steps=1 (set or absent) gives the same state bit for bit; 2 steps change it."""
  states = []
  for overrides in ({}, {"generator_steps": 1, "generator_schedule": "cosine"}, {"generator_steps": 2}):
    _, _, dist, state = tiny_setup(aux_updates=2, **overrides)
    step = jax.jit(dist.step)
    for _ in range(2):
      state, metrics = step(state)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    states.append(jax.device_get((state.gen.params, state.aux.params, state.ema_params)))
  today, one, two = (jax.tree_util.tree_leaves(s) for s in states)
  for a, b in zip(today, one):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(today, two))


def test_condition_pytrees_and_a_mask_id_above_the_codebook():
  """Text conditions (a pytree per example) and Meissonic's mask id above the codebook's end: the
  simulated inputs and k-step samples use the mask id, never the codebook size."""
  from test_dimo_text import B, random_cond, tiny_text_setup  # pylint: disable=import-outside-toplevel
  _, model, dist, state = tiny_text_setup(generator_steps=2)
  assert dist.mask_id != dist.codebook
  cond = random_cond(jax.random.key(1), (B,))
  labels, x_init = dist.draw_inputs(jax.random.key(2), B, cond)
  inputs, select = jax.jit(dist.simulate_inputs)(state.gen.params, x_init, labels, jax.random.key(3), 0.1)
  inputs, select, x_init = np.asarray(inputs), np.asarray(select), np.asarray(x_init)
  assert select.max() == 1
  for b in range(B):
    n0 = int((x_init[b] == dist.mask_id).sum())
    expected = n0 if select[b] == 0 else round(n0 / 2)  # linear, 2 steps: t_1 = r0 / 2
    assert int((inputs[b] == dist.mask_id).sum()) == expected
  assert np.all((inputs < dist.codebook) | (inputs == dist.mask_id))
  run = jax.jit(lambda p, k: gs.generate(gs.model_apply_fn(model, 0.1), p, k, cond, steps=2, seq_len=dist.seq_len,
                                         codebook_size=dist.codebook, mask_id=dist.mask_id))
  tokens = np.asarray(run(state.gen.params, jax.random.key(4)))
  assert tokens.shape == (B, dist.seq_len) and tokens.min() >= 0 and tokens.max() < dist.codebook


# ---------------------------------------------------------------------------- the run path
@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
  """A tiny ``configs/tokens.py`` teacher (3 steps) and a generator distilled from it at k = 2 (3 steps)."""
  import family_runs as runs  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import distill, teacher  # pylint: disable=import-outside-toplevel
  folder = str(tmp_path_factory.mktemp("k2"))
  teacher.train_teacher(runs.classes_config(folder, "teacher", 3), f"{folder}/teacher")
  c = runs.classes_config(folder, "distill", 3)
  c.teacher.checkpoint = f"{folder}/teacher"
  c.distill.generator_steps = 2
  distill.train_distill(c, f"{folder}/distill")
  return folder, c


def _sample_config(c, folder, tag, **sample):
  c = c.copy_and_resolve_references()
  c.mode = "sample"
  c.sample.model, c.sample.checkpoint = "generator", f"{folder}/distill"
  c.sample.num, c.sample.batch_size, c.sample.output = 6, 4, f"{folder}/{tag}.npy"
  for k, v in sample.items():
    c.sample[k] = v
  return c


def test_generator_folder_records_its_steps_and_samples_at_each(two_step_run):
  from dimo_jax.evaluation import settings  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import sample  # pylint: disable=import-outside-toplevel
  from dimo_jax.storage import loaders  # pylint: disable=import-outside-toplevel
  folder, c = two_step_run
  model, params, stored = loaders.load_generator(f"{folder}/distill")
  assert stored["distill"]["generator_steps"] == 2 and stored["distill"]["generator_schedule"] == "linear"
  assert settings.trained_generator(stored) == (2, "linear")

  default = sample.run_sample(_sample_config(c, folder, "default"), folder)
  two = sample.run_sample(_sample_config(c, folder, "two", generator_steps=2), folder)
  one = sample.run_sample(_sample_config(c, folder, "one", generator_steps=1), folder)
  assert default["generator_steps"] == 2 and two["generator_steps"] == 2 and one["generator_steps"] == 1
  tokens = {t: np.load(f"{folder}/{t}.npy") for t in ("default", "two", "one")}
  np.testing.assert_array_equal(tokens["default"], tokens["two"])
  assert not np.array_equal(tokens["one"], tokens["two"])
  # batch i of mode=sample draws with fold_in(key(seed), i): the first batch by hand, both ways.
  labels = np.load(f"{folder}/one_labels.npy")[:4]
  key = jax.random.fold_in(jax.random.key(0), 0)
  want1 = samplers.one_step_generate(model, params, key, jnp.asarray(labels), r_init=0.6, sigma=0.1)
  want2 = gs.generate(gs.model_apply_fn(model, 0.1), params, key, jnp.asarray(labels), steps=2, schedule="linear",
                      seq_len=model.seq_len, codebook_size=model.codebook_size, r_init=0.6)
  np.testing.assert_array_equal(tokens["one"][:4], np.asarray(want1))  # k = 1: today's one-step tokens, bit for bit
  np.testing.assert_array_equal(tokens["two"][:4], np.asarray(want2))


def test_generator_steps_above_the_trained_count_warn(two_step_run, monkeypatch):
  from dimo_jax.evaluation import settings  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import sample  # pylint: disable=import-outside-toplevel
  folder, c = two_step_run
  said = []
  monkeypatch.setattr(settings.logging, "warning", lambda msg, *a: said.append(msg % a) if "generator" in msg else None)
  out = sample.run_sample(_sample_config(c, folder, "three", generator_steps=3), folder)
  assert out["generator_steps"] == 3 and np.load(f"{folder}/three.npy").shape == (6, model_len(c))
  assert len(said) == 1 and "generator_steps=3 is above the 2 step(s)" in said[0], said
  said.clear()
  sample.run_sample(_sample_config(c, folder, "two_quiet", generator_steps=2), folder)
  assert not said


def model_len(c):
  return int(np.load(c.data.path).shape[1])


def test_generator_plan_known_answers_and_refusals(monkeypatch):
  from dimo_jax.evaluation import settings  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(settings.logging, "warning", lambda *a: None)
  assert settings.trained_generator({}) == (1, "linear")  # a folder from before the k-step generator
  plan = settings.generator_plan({"distill": {"generator_steps": 3, "generator_schedule": [0.4, 0.2]}})
  assert (plan.steps, plan.trained, plan.schedule) == (3, 3, (0.4, 0.2)) and plan.step_counts() == (1, 2, 3)
  assert plan.schedule_at(2) == (0.4,) and plan.schedule_at(1) == ()
  assert settings.generator_plan({}, 2).step_counts() == (1, 2)
  with pytest.raises(ValueError, match="generator_steps=4.*name no level for step 4; ask for at most 3"):
    settings.generator_plan({"distill": {"generator_steps": 3, "generator_schedule": [0.4, 0.2]}}, 4)
  with pytest.raises(ValueError, match="config.json records distill.generator_schedule"):
    settings.trained_generator({"distill": {"generator_steps": 2, "generator_schedule": "zigzag"}})
  with pytest.raises(ValueError, match="config.sample.generator_steps must be >= 0"):
    settings.sampler_settings_from_config({"generator_steps": -1})


def test_evaluate_table_has_a_generator_row_per_step_count(two_step_run):
  from dimo_jax.evaluation import tables  # pylint: disable=import-outside-toplevel
  from dimo_jax.modes import evaluate  # pylint: disable=import-outside-toplevel
  folder, c = two_step_run
  c = c.copy_and_resolve_references()
  c.mode = "evaluate"
  c.evaluate.num_samples, c.evaluate.teacher_steps, c.evaluate.teacher_samplers = 16, (1, 2), ("confidence",)
  c.evaluate.timing_repeats, c.evaluate.batch_size = 1, 8
  c.evaluate.output_dir = f"{folder}/eval"
  res = evaluate.run_evaluate(c, f"{folder}/distill")
  gens = [(r["name"], r["steps"]) for r in res["rows"] if r["model"] == "generator"]
  assert gens == [("generator_temp1", 1), ("generator_steps2_temp1", 2)]
  assert [r["steps"] for r in res["rows"] if r["model"] == "teacher"] == [1, 2]
  table = tables.format_table(res)
  assert "| Di[M]O | 1 |" in table and "| Di[M]O | 2 |" in table
  assert os.path.isfile(f"{folder}/eval/table.md")


def test_plot_marks_each_generator_step_count(tmp_path):
  from dimo_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  rows = [dict(name=f"teacher_steps{s}", model="teacher", steps=s, sampler="confidence", fd_pixel=100.0 / s,
               ms_per_sample=0.1 * s) for s in (1, 2, 4)]
  rows += [dict(name="generator_temp1", model="generator", steps=1, label="Di[M]O", fd_pixel=40.0, ms_per_sample=0.1),
           dict(name="generator_steps2_temp1", model="generator", steps=2, label="Di[M]O", fd_pixel=30.0,
                ms_per_sample=0.2)]
  fig = plots.plot_results({"rows": rows}, str(tmp_path / "q.png"), metrics=["fd_pixel"])
  steps_ax = fig.axes[0]
  stars = [l for l in steps_ax.get_lines() if l.get_marker() == "*"]
  assert [(float(l.get_xdata()[0]), float(l.get_ydata()[0])) for l in stars] == [(1.0, 40.0), (2.0, 30.0)]
  assert [t.get_text() for t in steps_ax.texts] == ["1 step", "2 steps"]
  assert [l.get_label() for l in stars] == ["Di[M]O", "_Di[M]O"]  # one legend entry for the generator
  # A one-step generator's star carries no count, as before.
  fig = plots.plot_results({"rows": rows[:4]}, str(tmp_path / "one.png"), metrics=["fd_pixel"])
  assert len(fig.axes[0].texts) == 0


def test_prompt_following_samples_and_notes_at_each_step_count():
  """The captioned digits' generator rows: one step is ``one_step_cond_sampler``'s draw, k steps
  ``generate``'s with the mask id above the codebook; the goal note has a sentence per step count."""
  from test_dimo_text import T, tiny_text_setup  # pylint: disable=import-outside-toplevel
  from dimo_jax.evaluation import prompt_following as pf  # pylint: disable=import-outside-toplevel
  _, model, dist, state = tiny_text_setup(generator_steps=2)
  rng = np.random.default_rng(0)
  table = {"text": rng.normal(size=(5, T, 24)).astype(np.float32), "pooled": rng.normal(size=(5, 32)).astype(np.float32)}
  ids = np.array([0, 1, 2, 3, 4, 0])
  kw = dict(r_init=0.6, sigma=0.1, temperature=1.0, seed=3, batch=4)
  one = pf.generator_samples(model, state.gen.params, table, ids, **kw)
  two = pf.generator_samples(model, state.gen.params, table, ids, steps=2, **kw)
  cond = {k: v[ids[:4]] for k, v in table.items()}
  key = jax.random.fold_in(jax.random.key(3), 0)
  want1 = samplers.one_step_cond_sampler(model.sampler_apply_fn(), state.gen.params, key, cond,
                                         seq_len=model.seq_len, mask_id=model.mask_id,
                                         codebook_size=model.codebook_size, r_init=0.6, noise_sigma=0.1)
  want2 = gs.generate(gs.model_apply_fn(model, 0.1), state.gen.params, key, cond, steps=2, seq_len=model.seq_len,
                      codebook_size=model.codebook_size, mask_id=model.mask_id)
  np.testing.assert_array_equal(one[:4], np.asarray(want1))
  np.testing.assert_array_equal(two[:4], np.asarray(want2))
  assert two.shape == (6, model.seq_len) and two.max() < model.codebook_size

  score = lambda acc, fd: {"seen": {"prompt_acc": acc, "fd_pixel": fd, "samples": 100}}
  rows = [{"model": "teacher (Meissonic sampler)", "steps": 16, "scores": score(90.0, 100.0)},
          {"model": "Di[M]O generator", "steps": 1, "scores": score(85.0, 110.0)},
          {"model": "Di[M]O generator", "steps": 2, "scores": score(88.0, 105.0)}]
  lines = pf.goal_note(rows, "seen").splitlines()
  assert lines[0].startswith("Di[M]O at 1 step on the seen prompts: prompt accuracy 85.0%")
  assert lines[1].startswith("Di[M]O at 2 steps on the seen prompts: prompt accuracy 88.0%")
  assert "FD-pixel 105.0 = 1.05x the teacher's best 100.0" in lines[1]


def test_a_bad_sample_r_init_names_its_flag(two_step_run):
  from dimo_jax.modes import sample  # pylint: disable=import-outside-toplevel
  folder, c = two_step_run
  bad = _sample_config(c, folder, "bad")
  with bad.unlocked():
    del bad.sample["r_init"]
    bad.sample.r_init = "sometimes"
  with pytest.raises(ValueError, match="config.sample.r_init='sometimes' is not valid"):
    sample.run_sample(bad, folder)
  assert not os.path.exists(f"{folder}/bad.npy")
