"""Parity of the Flax FID Inception-v3 with an independent PyTorch definition."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimo_jax.converters import pytorch_fid
from dimo_jax.networks import inception

torch = pytest.importorskip('torch')
F = torch.nn.functional
tnn = torch.nn


# --- Reference PyTorch definition (pytorch-fid layout and key names) -------------------


class TBasicConv(tnn.Module):

  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg_no_pad(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TA(tnn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TBasicConv(cin, 64, 1)
    self.branch5x5_1 = TBasicConv(cin, 48, 1)
    self.branch5x5_2 = TBasicConv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = TBasicConv(cin, 64, 1)
    self.branch3x3dbl_2 = TBasicConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TBasicConv(96, 96, 3, padding=1)
    self.branch_pool = TBasicConv(cin, pool_features, 1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_no_pad(x)),
    ], 1)


class TB(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TBasicConv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = TBasicConv(cin, 64, 1)
    self.branch3x3dbl_2 = TBasicConv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TBasicConv(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, 3, stride=2),
    ], 1)


class TC(tnn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = TBasicConv(cin, 192, 1)
    self.branch7x7_1 = TBasicConv(cin, c7, 1)
    self.branch7x7_2 = TBasicConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = TBasicConv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TBasicConv(cin, c7, 1)
    self.branch7x7dbl_2 = TBasicConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TBasicConv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TBasicConv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TBasicConv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = TBasicConv(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f'branch7x7dbl_{i}')(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_no_pad(x))], 1)


class TD(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TBasicConv(cin, 192, 1)
    self.branch3x3_2 = TBasicConv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = TBasicConv(cin, 192, 1)
    self.branch7x7x3_2 = TBasicConv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TBasicConv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TBasicConv(192, 192, 3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)],
                     1)


class TE(tnn.Module):

  def __init__(self, cin, use_max_pool):
    super().__init__()
    self.use_max_pool = use_max_pool
    self.branch1x1 = TBasicConv(cin, 320, 1)
    self.branch3x3_1 = TBasicConv(cin, 384, 1)
    self.branch3x3_2a = TBasicConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = TBasicConv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TBasicConv(cin, 448, 1)
    self.branch3x3dbl_2 = TBasicConv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = TBasicConv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TBasicConv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = TBasicConv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.use_max_pool:
      bp = F.max_pool2d(x, 3, stride=1, padding=1)
    else:
      bp = _avg_no_pad(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(bp)], 1)


class TInception(tnn.Module):

  def __init__(self, num_classes=1008):
    super().__init__()
    self.Conv2d_1a_3x3 = TBasicConv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = TBasicConv(32, 32, 3)
    self.Conv2d_2b_3x3 = TBasicConv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = TBasicConv(64, 80, 1)
    self.Conv2d_4a_3x3 = TBasicConv(80, 192, 3)
    self.Mixed_5b = TA(192, 32)
    self.Mixed_5c = TA(256, 64)
    self.Mixed_5d = TA(288, 64)
    self.Mixed_6a = TB(288)
    self.Mixed_6b = TC(768, 128)
    self.Mixed_6c = TC(768, 160)
    self.Mixed_6d = TC(768, 160)
    self.Mixed_6e = TC(768, 192)
    self.Mixed_7a = TD(768)
    self.Mixed_7b = TE(1280, use_max_pool=False)
    self.Mixed_7c = TE(2048, use_max_pool=True)
    self.fc = tnn.Linear(2048, num_classes)

  def forward(self, x, resize=True):
    """x: NCHW in [0, 1]; returns (pool, logits)."""
    if resize:
      x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
    return pool, self.fc(pool)


def _random_reference(seed=0, num_classes=1008):
  """Reference net with random conv weights and random BatchNorm affine/statistics."""
  torch.manual_seed(seed)
  net = TInception(num_classes)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, tnn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
      elif isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
      elif isinstance(m, tnn.Linear):
        m.weight.normal_(0.0, 2048 ** -0.5)
        m.bias.normal_(0.0, 0.1)
  return net.eval()


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope='module')
def reference():
  net = _random_reference()
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  return net, state


def test_parity_with_pytorch_reference(reference):
  net, state = reference
  # 139x139 is the smallest size at which Mixed_7b/7c see a 3x3 grid, so the max-pool
  # versus avg-pool branches (and padding-excluded averages) actually differ.
  rng = np.random.default_rng(0)
  images = rng.uniform(0.0, 1.0, size=(2, 139, 139, 3)).astype(np.float32)
  with torch.no_grad():
    t_pool, t_logits = net(torch.from_numpy(images).permute(0, 3, 1, 2), resize=False)
  variables = pytorch_fid.convert_pytorch_fid_state_dict(state)
  model = inception.InceptionV3(resize_input=False)
  pool, logits = jax.jit(model.apply)(variables, jnp.asarray(images))
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert pool.dtype == jnp.float32 and logits.dtype == jnp.float32
  t_pool, t_logits = t_pool.numpy(), t_logits.numpy()
  # Features must be non-degenerate for the comparison to mean anything.
  assert (t_pool > 0).mean() > 0.2 and np.std(t_pool) > 1e-3
  assert _rel_err(pool, t_pool) < 1e-5
  assert _rel_err(logits, t_logits) < 1e-5
  # The two images must give different features.
  assert _rel_err(pool[0], pool[1]) > 1e-2


@pytest.mark.parametrize('size', [(32, 48), (512, 400)])
def test_resize_matches_torch_bilinear(size):
  rng = np.random.default_rng(1)
  images = rng.uniform(0.0, 1.0, size=(1, *size, 3)).astype(np.float32)
  ours = inception.resize_bilinear(jnp.asarray(images), 299)
  ref = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299),
                      mode='bilinear', align_corners=False).permute(0, 2, 3, 1).numpy()
  assert ours.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_load_fid_inception_roundtrip(tmp_path, reference):
  net, _ = reference
  path = tmp_path / 'pt_inception.pth'
  torch.save(net.state_dict(), path)  # includes num_batches_tracked entries
  apply_fn, variables = pytorch_fid.load_fid_inception(path)
  assert variables['params']['fc']['kernel'].shape == (2048, 1008)
  np.testing.assert_array_equal(
      np.asarray(variables['params']['Conv2d_1a_3x3']['conv']['kernel']),
      net.Conv2d_1a_3x3.conv.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      np.asarray(variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var']),
      net.Mixed_7c.branch_pool.bn.running_var.numpy())
  # End to end: resize to 299 and [0, 1] -> [-1, 1] inside apply_fn.
  images = np.random.default_rng(2).uniform(0.0, 1.0, size=(1, 64, 48, 3)).astype(np.float32)
  pool, logits = apply_fn(variables, jnp.asarray(images))
  with torch.no_grad():
    t_pool, t_logits = net(torch.from_numpy(images).permute(0, 3, 1, 2), resize=True)
  assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
  assert _rel_err(pool, t_pool.numpy()) < 1e-5
  assert _rel_err(logits, t_logits.numpy()) < 1e-5


def test_load_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    pytorch_fid.load_fid_inception(tmp_path / 'nope.pth')


def test_convert_rejects_missing_extra_and_misshaped(reference):
  _, state = reference
  bad = dict(state)
  del bad['Mixed_6b.branch7x7_2.conv.weight']
  bad['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
  bad['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError) as info:
    pytorch_fid.convert_pytorch_fid_state_dict(bad)
  msg = str(info.value)
  assert 'Mixed_6b.branch7x7_2.conv.weight' in msg and '(128, 128, 1, 7)' in msg
  assert 'AuxLogits.fc.weight' in msg and '(1000, 768)' in msg
  assert 'fc.weight: got (1000, 2048), expected (1008, 2048)' in msg


def test_convert_with_other_num_classes(reference):
  _, state = reference
  bad = dict(state)
  bad['fc.weight'] = np.zeros((10, 2048), np.float32)
  bad['fc.bias'] = np.zeros((10,), np.float32)
  variables = pytorch_fid.convert_pytorch_fid_state_dict(bad, num_classes=10)
  assert variables['params']['fc']['kernel'].shape == (2048, 10)


def test_convert_empty_lists_missing_keys():
  with pytest.raises(ValueError, match=r'Conv2d_1a_3x3\.conv\.weight \(32, 3, 3, 3\)'):
    pytorch_fid.convert_pytorch_fid_state_dict({})
