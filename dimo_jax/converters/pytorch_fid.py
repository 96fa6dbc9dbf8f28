"""pytorch-fid's FID Inception weights (``pt_inception-2015-12-05``) to ``networks.inception``."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dimo_jax.converters.common import to_numpy
from dimo_jax.networks.inception import FID_NUM_CLASSES, InceptionV3

Dtype = Any

# --- PyTorch (pytorch-fid) state dict conversion -----------------------------------------

_PARAM_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_STAT_TO_TORCH = {'mean': 'running_mean', 'var': 'running_var'}


def _torch_key_and_shape(collection: str, path: Sequence[str], shape: Tuple[int, ...]):
  """pytorch-fid key and tensor shape for one Flax leaf."""
  *modules, leaf = path
  table = _PARAM_TO_TORCH if collection == 'params' else _STAT_TO_TORCH
  key = '.'.join(list(modules) + [table[leaf]])
  if leaf == 'kernel' and len(shape) == 4:  # HWIO -> OIHW
    shape = (shape[3], shape[2], shape[0], shape[1])
  elif leaf == 'kernel' and len(shape) == 2:  # [in, out] -> [out, in]
    shape = (shape[1], shape[0])
  return key, tuple(shape)


def _flax_variable_shapes(num_classes: int) -> Dict[str, Any]:
  model = InceptionV3(num_classes=num_classes, resize_input=False)
  dummy = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)


def _flatten(tree: Mapping, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _set(tree: Dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, Any],
                                   num_classes: int = FID_NUM_CLASSES) -> Dict[str, Any]:
  """Converts a pytorch-fid FID Inception state dict to Flax variables.

  Args:
    state_dict: mapping from pytorch-fid names (`Conv2d_1a_3x3.conv.weight`,
      `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight`, ...) to arrays or tensors.
      `*.num_batches_tracked` entries are ignored.
    num_classes: rows of `fc.weight`.

  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays for
    `InceptionV3(num_classes=num_classes)`.

  Raises:
    ValueError: listing every missing key, unexpected key and shape mismatch.
  """
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'state_dict must be a mapping of names to tensors, got '
                     f'{type(state_dict).__name__}.')
  given = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  shapes = _flax_variable_shapes(num_classes)

  expected = {}  # torch key -> (collection, flax path, torch shape)
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(shapes[collection]):
      key, tshape = _torch_key_and_shape(collection, path, leaf.shape)
      expected[key] = (collection, path, tshape)

  problems = []
  missing = sorted(set(expected) - set(given))
  extra = sorted(set(given) - set(expected))
  if missing:
    problems.append('missing keys:\n' + '\n'.join(
        f'  {k} {expected[k][2]}' for k in missing))
  if extra:
    problems.append('unexpected keys:\n' + '\n'.join(
        f'  {k} {tuple(np.shape(to_numpy(given[k])))}' for k in extra))

  variables: Dict[str, Any] = {'params': {}, 'batch_stats': {}}
  mismatched = []
  for key in sorted(set(expected) & set(given)):
    collection, path, tshape = expected[key]
    value = to_numpy(given[key])
    if tuple(value.shape) != tshape:
      mismatched.append(f'  {key}: got {tuple(value.shape)}, expected {tshape}')
      continue
    value = value.astype(np.float32)
    if value.ndim == 4:
      value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T
    _set(variables[collection], path, np.ascontiguousarray(value))
  if mismatched:
    problems.append('shape mismatches:\n' + '\n'.join(mismatched))
  if problems:
    raise ValueError('State dict does not match the FID Inception-v3 '
                     f'(num_classes={num_classes}); ' + '\n'.join(problems))
  return variables


def load_fid_inception(path, dtype: Dtype = jnp.float32
                       ) -> Tuple[Callable[..., Tuple[jax.Array, jax.Array]], Dict[str, Any]]:
  """Loads pytorch-fid weights (`pt_inception-2015-12-05-*.pth`).

  Returns:
    (apply_fn, variables) with apply_fn(variables, images [N, H, W, 3] in [0, 1]) ->
    (pool [N, 2048], logits [N, 1008]); apply_fn is jitted.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'FID Inception weights not found: {path}. Download pytorch-fid\'s '
        'pt_inception-2015-12-05-6726825d.pth and pass its path.')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Loading a .pth file requires PyTorch (pip install torch).') from e
  state_dict = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'{path} does not hold a state dict (got {type(state_dict).__name__}).')
  num_classes = FID_NUM_CLASSES
  if 'fc.weight' in state_dict:
    num_classes = int(state_dict['fc.weight'].shape[0])
  variables = convert_pytorch_fid_state_dict(state_dict, num_classes=num_classes)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  model = InceptionV3(num_classes=num_classes, dtype=dtype)
  apply_fn = jax.jit(model.apply)
  return apply_fn, variables
