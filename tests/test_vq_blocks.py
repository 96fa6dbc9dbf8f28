"""The VQ tokenizers' shared blocks (``networks/vq_blocks.py``): the parameter trees the converters
and converted folders rely on, and the blocks' variants."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.networks import meissonic_vq, vq_blocks, vqgan, vqgan_google

# Written once by initialising the tokenizers at these configurations, before their blocks moved
# into vq_blocks: every path and shape of ``init`` (parameters of encoder, codebook and decoder).
_TREES = os.path.join(os.path.dirname(__file__), "data", "vq_param_trees.json")

_MODELS = {
  "taming": lambda: vqgan.TamingVQGAN(vqgan.TamingConfig(
      ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8, z_channels=8,
      embed_dim=4, n_embed=8, num_groups=4)),
  "google": lambda: vqgan_google.GoogleVQGAN(vqgan_google.GoogleVQGANConfig(
      filters=8, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=4, codebook_size=8,
      image_size=8, num_groups=4)),
  "meissonic": lambda: meissonic_vq.MeissonicVQModel(meissonic_vq.MeissonicVQConfig(
      block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, num_vq_embeddings=8,
      norm_num_groups=4)),
}


def _tree(module):
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
  return [f"{jax.tree_util.keystr(path)} {list(leaf.shape)}" for path, leaf in flat]


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_param_tree_is_the_recorded_one(name):
  with open(_TREES) as f:
    expected = json.load(f)[name]
  got = _tree(_MODELS[name]())
  assert [k for k in got if k not in expected] == []
  assert [k for k in expected if k not in got] == []
  assert got == expected


def _block_params(block, x):
  return block.init(jax.random.PRNGKey(1), x)["params"]


def test_resnet_block_shortcut_variants():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  # Same width: the identity skip, no shortcut parameter.
  same = vq_blocks.ResnetBlock(8, 4)
  assert sorted(_block_params(same, x)) == ["conv1", "conv2", "norm1", "norm2"]
  # Wider, shortcut on the input (Taming / diffusers), named as asked.
  wide = vq_blocks.ResnetBlock(16, 4, shortcut="conv_shortcut")
  p = _block_params(wide, x)
  assert sorted(p) == ["conv1", "conv2", "conv_shortcut", "norm1", "norm2"]
  zero_main = dict(p, conv2={"kernel": jnp.zeros_like(p["conv2"]["kernel"]),
                             "bias": jnp.zeros_like(p["conv2"]["bias"])})
  y = wide.apply({"params": zero_main}, x)
  expected = jnp.einsum("bhwc,cd->bhwd", x, p["conv_shortcut"]["kernel"][0, 0]) + p["conv_shortcut"]["bias"]
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)
  # Google's: bias-free, the shortcut reads the main path's output, so a zero main path gives zero.
  google = vqgan_google.GoogleResBlock(16, 4)
  pg = _block_params(google, x)
  assert sorted(pg) == ["Conv_0", "Conv_1", "Conv_2", "GroupNorm_0", "GroupNorm_1"]
  assert all("bias" not in pg[k] for k in ("Conv_0", "Conv_1", "Conv_2"))
  zero_g = dict(pg, Conv_1={"kernel": jnp.zeros_like(pg["Conv_1"]["kernel"])})
  assert float(jnp.max(jnp.abs(google.apply({"params": zero_g}, x)))) == 0.0


def test_downsample_pads_bottom_right():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 2))
  block = vq_blocks.Downsample()
  p = _block_params(block, x)
  y = block.apply({"params": p}, x)
  assert y.shape == (1, 2, 2, 2)
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  # Output pixel (1, 1) reads rows and columns 2..4 of the padded input (row and column 4 zero).
  window = padded[0, 2:5, 2:5, :]
  expected = jnp.einsum("hwc,hwcd->d", window, p["conv"]["kernel"]) + p["conv"]["bias"]
  np.testing.assert_allclose(np.asarray(y[0, 1, 1]), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_codebook_nearest_and_lookup():
  book = vq_blocks.Codebook(3, 2, "codebook", lambda key, shape, dtype: jnp.array(
      [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype))
  z = jnp.array([[[0.9, 0.1], [0.1, 1.5]], [[-0.2, 0.0], [0.5, 0.0]]])
  variables = book.init(jax.random.PRNGKey(0), z, method="nearest")
  assert list(variables["params"]) == ["codebook"]
  codes = book.apply(variables, z, method="nearest")
  # (0.5, 0) is as far from row 0 as from row 1: the first row wins.
  assert codes.tolist() == [[1, 2], [0, 0]]
  np.testing.assert_array_equal(np.asarray(book.apply(variables, codes, method="lookup"))[0, 1], [0.0, 2.0])


def test_level_channels_refused_with_the_field_named():
  with pytest.raises(ValueError, match=r"MeissonicVQConfig.block_out_channels: .*12.*norm_num_groups = 8"):
    meissonic_vq.MeissonicVQConfig(block_out_channels=(16, 12), norm_num_groups=8)
  with pytest.raises(ValueError, match=r"GoogleVQGANConfig.channel_multipliers must list at least one"):
    vqgan_google.GoogleVQGANConfig(channel_multipliers=())
