"""config.evaluate.fid_protocol='paper' against clean-fid's legacy_tensorflow mode: the 8-bit PNG
values and clean-fid's own image loading, TensorFlow 1's bilinear resize (as TensorFlow and the
torchscript Inception clean-fid downloads compute it), and the features through this project's
Inception; the settings and reference-statistics errors."""

import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

cleanfid = pytest.importorskip("cleanfid")
torch = pytest.importorskip("torch")

from cleanfid import resize as cf_resize  # noqa: E402
from PIL import Image  # noqa: E402

from dimo_jax.converters import pytorch_fid  # noqa: E402
from dimo_jax.evaluation import features, fid_protocol, sample_sets, settings  # noqa: E402
from dimo_jax.networks.inception import InceptionV3  # noqa: E402
from dimo_jax.storage import loaders  # noqa: E402


class _ToTensor:
  """torchvision.transforms.ToTensor for HWC NumPy images: CHW, uint8 divided by 255."""

  def __call__(self, pic):
    t = torch.from_numpy(np.ascontiguousarray(pic.transpose((2, 0, 1))))
    return t.to(torch.get_default_dtype()).div(255) if t.dtype == torch.uint8 else t


def _resize_dataset_class():
  """clean-fid's ``ResizeDataset`` (how it reads image files for its network). Where the installed
  torchvision cannot load (its compiled ops do not match torch), clean-fid's ``utils.py`` is loaded
  with ``torchvision.transforms.ToTensor`` as torchvision defines it for NumPy images."""
  try:
    from cleanfid import utils  # pylint: disable=import-outside-toplevel
    return utils.ResizeDataset
  except (ImportError, RuntimeError, OSError):
    pass
  saved = sys.modules.get("torchvision")
  fake = types.ModuleType("torchvision")
  fake.transforms = types.SimpleNamespace(ToTensor=_ToTensor)
  sys.modules["torchvision"] = fake
  try:
    spec = importlib.util.spec_from_file_location("_cleanfid_utils", os.path.join(os.path.dirname(cleanfid.__file__),
                                                                                 "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    if saved is None:
      sys.modules.pop("torchvision", None)
    else:
      sys.modules["torchvision"] = saved
  return module.ResizeDataset


def _images(n, h, w, seed=0):
  return np.random.default_rng(seed).uniform(-0.02, 1.02, (n, h, w, 3)).astype(np.float32)


def _authors_uint8(images01):
  """How the Di[M]O authors wrote their samples: ``(x * 127.5 + 128).clip(0, 255).to(uint8)`` on
  [-1, 1] images (sample_MaskGit.py)."""
  x = torch.from_numpy(images01 * 2.0 - 1.0)
  return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()


def _write_pngs(folder, uint8_images):
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, img in enumerate(uint8_images):
    paths.append(os.path.join(folder, f"{i:06d}.png"))
    Image.fromarray(img, "RGB").save(paths[-1])
  return paths


def _torchscript_resize(x_nchw):
  """The resize inside inception-2015-12-05.pt, the network clean-fid's legacy_tensorflow mode
  runs on [0, 255] images: TensorFlow 1's bilinear resize written with affine_grid / grid_sample."""
  n, c, h, w = x_nchw.shape
  theta = torch.eye(2, 3, dtype=torch.float32)
  theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
  theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
  theta = theta.unsqueeze(0).repeat([n, 1, 1])
  grid = torch.nn.functional.affine_grid(theta, [n, c, 299, 299], align_corners=False)
  return torch.nn.functional.grid_sample(x_nchw, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_8bit_values_match_the_authors_pngs_as_clean_fid_reads_them(tmp_path):
  images = _images(3, 24, 40)
  ours = np.asarray(fid_protocol.quantize_8bit(images))
  authors = _authors_uint8(images)
  np.testing.assert_array_equal(ours, authors.astype(np.float32))
  paths = _write_pngs(str(tmp_path / "png"), authors)
  first = authors[0]
  assert cf_resize.build_resizer("legacy_tensorflow")(first) is first  # no resize outside the network
  dataset = _resize_dataset_class()(paths, mode="legacy_tensorflow")
  for i in range(len(paths)):
    got = dataset[i].numpy()  # [3, H, W] float32 in [0, 255], what clean-fid feeds its network
    np.testing.assert_allclose(got, ours[i].transpose(2, 0, 1), rtol=0, atol=1e-4)  # k / 255 * 255


@pytest.mark.parametrize("size", [(24, 40), (256, 256), (320, 300), (299, 299)])
def test_tf1_resize_matches_the_torchscript_network(size):
  x = np.asarray(fid_protocol.quantize_8bit(_images(2, *size, seed=1)))
  ours = np.asarray(fid_protocol.resize_bilinear_tf1(jnp.asarray(x)))
  ref = _torchscript_resize(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  ref = ref.numpy().transpose(0, 2, 3, 1)
  assert ours.shape == (2, 299, 299, 3)
  # grid_sample's float32 source coordinates are off by up to ~3e-5 pixel: up to ~1e-2 of 255
  np.testing.assert_allclose(ours, ref, atol=2e-2, rtol=0)
  # not the project protocol's half-pixel resize
  if size != (299, 299):
    half = np.asarray(jax.image.resize(jnp.asarray(x), (2, 299, 299, 3), "bilinear", antialias=False))
    assert np.abs(half - ref).max() > 1.0


def test_tf1_resize_matches_tensorflow():
  tf = pytest.importorskip("tensorflow")
  x = np.asarray(fid_protocol.quantize_8bit(_images(2, 256, 256, seed=2)))
  want = tf.compat.v1.image.resize_bilinear(x, (299, 299), align_corners=False, half_pixel_centers=False).numpy()
  got = np.asarray(fid_protocol.resize_bilinear_tf1(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def _inception_variables(seed=0):
  """Random FID Inception variables of the right shapes (He-scaled kernels, unit BatchNorm)."""
  shapes = jax.eval_shape(InceptionV3(resize_input=False).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if name == "bias" and len(path) == 3 and path[1].key == "fc":
      return rng.normal(0.0, 1.0, leaf.shape).astype(np.float32)
    return np.zeros(leaf.shape, np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_paper_features_equal_clean_fid_preprocessing_through_the_project_inception(tmp_path, monkeypatch):
  """Reference images (PNG) through ``features.build_reference`` with fid_protocol='paper' against
  clean-fid's loading + the torchscript network's resize and scaling + this project's Inception."""
  variables = _inception_variables()
  images = _authors_uint8(_images(3, 64, 64, seed=3))
  folder = str(tmp_path / "ref")
  paths = _write_pngs(folder, images)
  d = 2048
  np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", mu=np.zeros(d), sigma=np.eye(d), mu_s=np.zeros(3))

  monkeypatch.setattr(loaders, "load_vqgan", lambda path: (None, {}))
  monkeypatch.setattr(pytorch_fid, "load_fid_inception", lambda path: (None, variables))
  config = ml_collections.ConfigDict({"vqgan": {"checkpoint": "vq"}, "evaluate": {
      "inception_path": "inception.pth", "fid_protocol": "paper", "reference_images": folder,
      "reference_image_size": 64, "reference_stats": str(tmp_path / "VIRTUAL_imagenet256_labeled.npz"),
      "batch_size": 4}})
  s = settings.settings_from_config(config)
  ex = features.build_extractors(config, s, None, None, str(tmp_path / "out"), sample_sets.Devices())
  assert ex.inception_id.endswith("|fid_protocol=paper")
  ref = features.build_reference(s, None, ex, str(tmp_path / "out"))
  assert ref.inc_stats[0].shape == (d,) and ref.num == 3

  dataset = _resize_dataset_class()(paths, mode="legacy_tensorflow")
  batch = torch.stack([dataset[i] for i in range(len(paths))])  # [N, 3, 64, 64] in [0, 255]
  x = ((_torchscript_resize(batch) - 128) / 128).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(fid_protocol.paper_inputs(images.astype(np.float32) / 255.0)), x,
                             atol=1.5e-4, rtol=0)
  module = InceptionV3(resize_input=False, normalize_input=False)
  pool, logits = jax.jit(module.apply)(variables, jnp.asarray(x))
  pool, logits = np.asarray(pool), np.asarray(logits) - variables["params"]["fc"]["bias"]
  got_pool, got_logits = ref.features.inc_pool, ref.features.inc_logits
  scale = np.abs(pool).max()
  assert scale > 1e-3
  np.testing.assert_allclose(got_pool, pool, atol=2e-4 * scale, rtol=0)
  np.testing.assert_allclose(got_logits, logits, atol=2e-4 * np.abs(logits).max(), rtol=0)


def test_settings_and_reference_statistics_errors(tmp_path):
  config = ml_collections.ConfigDict({"evaluate": {"fid_protocol": "clean"}})
  with pytest.raises(ValueError, match=r"fid_protocol='clean' is not valid; choose one of \['project', 'paper'\]"):
    settings.settings_from_config(config)
  assert settings.settings_from_config(ml_collections.ConfigDict({})).fid_protocol == "project"
  with pytest.raises(ValueError, match="fid_protocol='paper' computes FID against the ADM ImageNet-256 reference "
                                       "statistics: set config.evaluate.reference_stats"):
    fid_protocol.check_reference("paper", "")
  fid_protocol.check_reference("project", "")

  np.savez(tmp_path / "spatial.npz", mu_s=np.zeros(4), sigma_s=np.eye(4), arr_0=np.zeros((1, 2, 2, 3)))
  with pytest.raises(ValueError, match=r"lacks key\(s\) \['mu', 'sigma'\]; found keys \['arr_0', 'mu_s', "
                                       r"'sigma_s'\].*fid_stats_imagenet256_guided_diffusion\.npz"):
    fid_protocol.load_reference_stats(str(tmp_path / "spatial.npz"), "paper")
  np.savez(tmp_path / "small.npz", mu=np.zeros(6), sigma=np.eye(6))
  with pytest.raises(ValueError, match="mu has 6 features; fid_protocol='paper' compares Inception pool3 features"):
    fid_protocol.load_reference_stats(str(tmp_path / "small.npz"), "paper")
  mu, sigma = fid_protocol.load_reference_stats(str(tmp_path / "small.npz"), "project")
  assert mu.shape == (6,) and sigma.shape == (6, 6)
