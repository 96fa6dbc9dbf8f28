"""Known joints, their exact teacher, and Di[M]O on the copy pair (x, x), x ~ U{0..7}."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from dimo_jax.core import samplers
from dimo_jax.data import joints
from dimo_jax.method import dimo, mdm
from dimo_jax.networks import exact, maskgit

V = 8


# ----------------------------------------------------------------------------- joints and scores
def test_copy_pair_joint():
  joint = joints.copy_pair(V)
  assert joint.support.shape == (V * V, 2)
  np.testing.assert_allclose(joint.probs.sum(), 1.0)
  diag = joint.support[:, 0] == joint.support[:, 1]
  np.testing.assert_allclose(joint.probs[diag], 1.0 / V)
  assert np.all(joint.probs[~diag] == 0)
  np.testing.assert_array_equal(joint.index(joint.support), np.arange(V * V))


def test_markov_mixture_joint_is_normalised_and_not_a_product():
  joint = joints.markov_mixture(4, 5, 3, seed=1)
  assert joint.support.shape == (4**5, 5)
  np.testing.assert_allclose(joint.probs.sum(), 1.0)
  assert np.all(joint.probs >= 0)
  np.testing.assert_array_equal(joint.probs, joints.markov_mixture(4, 5, 3, seed=1).probs)
  assert not np.allclose(joint.probs, joints.markov_mixture(4, 5, 3, seed=2).probs)
  # The product of the per-position marginals (what one parallel step samples) is far from it.
  marg = [np.bincount(joint.support[:, i], weights=joint.probs, minlength=4) for i in range(5)]
  product = np.prod([marg[i][joint.support[:, i]] for i in range(5)], axis=0)
  assert 0.5 * np.abs(product - joint.probs).sum() > 0.2


def test_tv_distance_known_answers():
  joint = joints.copy_pair(V)
  exact = np.stack([np.arange(V), np.arange(V)], 1)
  assert joints.tv_distance(joint, exact) == pytest.approx(0.0, abs=1e-12)
  assert joints.tv_distance(joint, np.zeros((10, 2), np.int32)) == pytest.approx(1 - 1 / V)
  # Half the mass off the diagonal: TV = 0.5.
  off = np.stack([np.arange(V), (np.arange(V) + 1) % V], 1)
  assert joints.tv_distance(joint, np.concatenate([exact, off])) == pytest.approx(0.5)


def test_tv_of_truth_sample_is_small_and_shrinks():
  joint = joints.markov_mixture(4, 6, 3, seed=0)
  small, large = joints.sampling_floor(joint, 2000, seed=0), joints.sampling_floor(joint, 100000, seed=0)
  assert large < 0.05
  assert large < small
  assert joints.sampling_floor(joints.copy_pair(V), 100000) < 0.01


def test_diversity_and_position_entropy():
  joint = joints.copy_pair(4)
  x = np.array([[0, 0], [0, 0], [1, 1], [2, 2]])
  d = joints.diversity(joint, x)
  assert d["distinct"] == 3 and d["top_share"] == pytest.approx(0.5)
  assert d["entropy"] == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)))
  assert joints.position_entropy(np.stack([np.arange(4)] * 2, 1), 4) == pytest.approx(1.0)
  assert joints.position_entropy(np.zeros((5, 2), int), 4) == pytest.approx(0.0)


def test_bad_input_fails_clearly():
  joint = joints.copy_pair(V)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    joints.tv_distance(joint, np.full((3, 2), V))  # mask ids left in
  with pytest.raises(ValueError, match=r"\[N, L=2\]"):
    joints.tv_distance(joint, np.zeros((3, 3), np.int32))
  with pytest.raises(ValueError, match="vocab_size"):
    joints.copy_pair(0)
  with pytest.raises(ValueError, match="too many to enumerate"):
    joints.markov_mixture(8, 9)


# ----------------------------------------------------------------------------- the exact teacher
def teacher_probs(joint, tokens):
  teacher = exact.exact_teacher(joint)
  logits = jax.jit(teacher.apply)({}, jnp.asarray(tokens, jnp.int32), jnp.zeros((len(tokens),), jnp.int32))
  assert logits.shape == (len(tokens), joint.seq_len, joint.vocab_size + 1)
  assert np.all(np.asarray(logits[..., -1]) < -1e8)  # the mask column is never drawn
  return np.asarray(jax.nn.softmax(logits, -1))


def test_exact_teacher_copy_pair_conditionals():
  joint = joints.copy_pair(V)
  p = teacher_probs(joint, [[V, V], [3, V], [V, 5], [2, 6]])
  np.testing.assert_allclose(p[0, :, :V], 1.0 / V, atol=1e-6)  # all masked: uniform marginals
  np.testing.assert_allclose(p[1, 1, 3], 1.0, atol=1e-6)  # copy the visible token
  np.testing.assert_allclose(p[1, 0, 3], 1.0, atol=1e-6)  # a visible position predicts itself
  np.testing.assert_allclose(p[2, 0, 5], 1.0, atol=1e-6)
  assert np.all(np.isfinite(p[3]))  # an impossible context gives finite output


def test_exact_teacher_markov_conditional_matches_enumeration():
  joint = joints.markov_mixture(3, 4, 2, seed=3)
  x = np.array([[1, 3, 0, 3]])  # positions 1 and 3 masked (mask id 3)
  p = teacher_probs(joint, x)[0]
  keep = (joint.support[:, 0] == 1) & (joint.support[:, 2] == 0)
  w = joint.probs * keep
  for pos in (1, 3):
    want = np.bincount(joint.support[:, pos], weights=w, minlength=3) / w.sum()
    np.testing.assert_allclose(p[pos, :3], want, atol=1e-5)


def exact_apply(joint):
  teacher = exact.exact_teacher(joint)
  return lambda params, tokens, labels: teacher.apply({}, tokens, labels)


def test_exact_teacher_one_step_samples_agree_one_time_in_eight():
  """One parallel step from all masks draws the two tokens independently."""
  joint = joints.copy_pair(V)
  one = np.asarray(samplers.confidence_sampler(exact_apply(joint), {}, jax.random.key(0),
                                               jnp.zeros((4000,), jnp.int32), seq_len=2, codebook_size=V,
                                               steps=1))
  assert abs((one[:, 0] == one[:, 1]).mean() - 1 / V) < 0.03
  assert joints.position_entropy(one, V) > 0.99
  assert joints.tv_distance(joint, one) > 0.8


# ----------------------------------------------------------------------------- Di[M]O on the copy pair
def copy_model():
  return maskgit.MaskTransformer(codebook_size=V, seq_len=2, num_classes=0, width=32, depth=1, heads=2,
                                mlp_dim=64, scan=False)


def one_step_stats(generate, params):
  x = np.asarray(generate(params, jax.random.key(99)))
  return float((x[:, 0] == x[:, 1]).mean()), joints.position_entropy(x, V), x


def test_dimo_copy_pair_one_step_generator_learns_the_joint():
  """The recommended copy-pair setting (docs/proofs.md): auxiliary lr 3x the generator's and 4
  auxiliary updates per generator update. The student starts from a masked-only MDM (agreement
  ~0.2); after 200 Di[M]O steps its one-step samples agree >= 95% and cover all values."""
  with jax.default_prng_impl("rbg"):  # faster to compile on CPU than threefry
    run_copy_pair_dimo()


def run_copy_pair_dimo():
  joint = joints.copy_pair(V)
  model = copy_model()
  generate = jax.jit(lambda p, k: samplers.one_step_generate(model, p, k, jnp.zeros((4000,), jnp.int32),
                                                            r_init=0.6, sigma=0.1))
  student = mdm.pretrain_copy_mdm(model, jax.random.key(0), steps=100)
  agree0, _, _ = one_step_stats(generate, student)
  assert agree0 < 0.5

  cfg = digits.get_config()
  d = cfg.distill
  d.batch_size, d.gen_lr, d.aux_lr, d.aux_updates = 128, 1e-3, 3e-3, 4
  d.warmup_steps, d.freeze, d.ema_decay = 10, (), 0.99
  dist = dimo.build_distiller(cfg, model, teacher_model=exact.exact_teacher(joint))
  state = dist.init_state({}, 0, student_params=student)
  step, state = dist.jit_step(state)
  for _ in range(200):
    state, metrics = step(state)
  assert float(metrics["gen/nan_count"]) == 0
  agree, ent, x = one_step_stats(generate, state.gen.params)
  assert agree >= 0.95, agree
  assert ent >= 0.9, ent
  assert joints.tv_distance(joint, x) < 0.06
