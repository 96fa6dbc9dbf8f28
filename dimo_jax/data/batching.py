"""Deterministic batch streams: batch k of a run is a pure function of (seed, k), so a resumed run
continues the stream; each process reads only its share.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

# ----------------------------------------------------------------------------
# Batches.


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int, *,
                  shard_index: int = 0, num_shards: int = 1) -> np.ndarray:
  """Example indices of this shard's part of global batch `step`.

  Global batches of batch_size * num_shards examples are cut from a fresh
  permutation per epoch (seeded by (seed, epoch)); the remainder of each
  epoch is dropped, so a global batch never repeats an example. Shard i gets
  rows [i * batch_size, (i + 1) * batch_size) of the global batch.
  """
  global_bs = _check_batching(num_examples, batch_size, shard_index,
                              num_shards)
  if step < 0:
    raise ValueError(f'step must be >= 0, got {step}.')
  steps_per_epoch = num_examples // global_bs
  epoch, k = divmod(int(step), steps_per_epoch)
  perm = _epoch_permutation(num_examples, seed, epoch)
  start = k * global_bs + shard_index * batch_size
  return perm[start:start + batch_size]


def _check_batching(num_examples, batch_size, shard_index, num_shards) -> int:
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index must be in [0, num_shards={num_shards}), '
                     f'got {shard_index}.')
  global_bs = batch_size * num_shards
  if num_examples < global_bs:
    raise ValueError(
        f'The dataset has {num_examples} examples, fewer than one global '
        f'batch ({batch_size} per host x {num_shards} hosts = {global_bs}); '
        f'lower the batch size or use more data.')
  return global_bs


def batch_iterator(tokens: np.ndarray, labels: Optional[np.ndarray],
                   batch_size: int, seed: int, *, shard_index: int = 0,
                   num_shards: int = 1, start_step: int = 0
                   ) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
  """Infinite stream of (tokens [B, L], labels [B] or None) numpy batches.

  Batch k is a pure function of (seed, k) (see `batch_indices`): starting at
  `start_step` = k yields exactly the batches k, k+1, ... of an uninterrupted
  run. With num_shards hosts, each host gets a disjoint `batch_size` slice
  of every global batch.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be [N, L], got shape {tokens.shape}.')
  n = tokens.shape[0]
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (n,):
      raise ValueError(f'labels must have shape ({n},) to match tokens, got '
                       f'{labels.shape}.')
  global_bs = _check_batching(n, batch_size, shard_index, num_shards)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  steps_per_epoch = n // global_bs

  def gen():
    step = int(start_step)
    cached_epoch, perm = -1, None
    while True:
      epoch, k = divmod(step, steps_per_epoch)
      if epoch != cached_epoch:
        cached_epoch, perm = epoch, _epoch_permutation(n, seed, epoch)
      start = k * global_bs + shard_index * batch_size
      idx = perm[start:start + batch_size]
      yield tokens[idx], (None if labels is None else labels[idx])
      step += 1

  return gen()
