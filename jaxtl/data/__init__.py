"""Input pipelines. Datasets are held as dicts of equal-length numpy arrays; `batches` walks them
in a seeded order that depends only on (seed, epoch), so a resumed run sees the same batches."""
import numpy as np


def num_examples(arrays: dict) -> int:
  return len(next(iter(arrays.values())))


def batches(arrays: dict, batch_size: int, *, seed=0, epoch=0, shuffle=False, drop_remainder=False,
            start=0):
  """Yields dicts of `batch_size` rows, from batch index `start` on.

  Without drop_remainder the last batch is padded to full size by repeating row 0, and every batch
  carries 'mask' (1 for real rows, 0 for padding), so evaluation counts each example once."""
  n = num_examples(arrays)
  order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
  stop = n - n % batch_size if drop_remainder else n
  for begin in range(start * batch_size, stop, batch_size):
    idx = order[begin:begin + batch_size]
    real = len(idx)
    if real < batch_size:
      idx = np.concatenate([idx, np.full(batch_size - real, order[0])])
    batch = {k: v[idx] for k, v in arrays.items()}
    if not drop_remainder:
      batch['mask'] = (np.arange(batch_size) < real).astype(np.float32)
    yield batch


def split_holdout(labels: np.ndarray, fraction: float, seed: int):
  """(train_idx, test_idx): a stratified held-out split, `fraction` of each class."""
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test.extend(idx[:int(round(fraction * len(idx)))])
  test = np.sort(np.array(test, dtype=np.int64))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test
