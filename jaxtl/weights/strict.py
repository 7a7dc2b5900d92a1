"""Strict merging of converted tensors into a model's params.

Every source tensor must be used or explicitly dropped; every target param must be filled or
explicitly new; every shape must match. All problems are reported together, by name and shape.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtl.errors import WeightsError

_MAX_LISTED = 25


def flatten(tree) -> dict:
  """{'a/b/c': leaf} for a nested dict of params."""
  return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: dict):
  return traverse_util.unflatten_dict(flat, sep='/')


def _listing(lines):
  lines = list(lines)
  shown = '\n    '.join(lines[:_MAX_LISTED])
  more = f'\n    ... and {len(lines) - _MAX_LISTED} more' if len(lines) > _MAX_LISTED else ''
  return f'\n    {shown}{more}'


def matches(pattern, *names) -> bool:
  """Whether a dont_load / new regex full-matches any of the names. A variable path also counts
  without its 'params/' prefix, so users write param paths as freezing schemes do."""
  for name in names:
    if name and (re.fullmatch(pattern, name) or (
        name.startswith('params/') and re.fullmatch(pattern, name[len('params/'):]))):
      return True
  return False


def merge(source_name, target_shapes, converted, *, source_shapes=None, unmapped=(), new=(),
          dont_load=(), dtype=None):
  """(variables for `target_shapes` ({variable path: ShapeDtypeStruct}) from `converted`, the
  sorted source keys that were dropped).

  Variable paths start with their collection ('params/encoder/...', 'batch_stats/...').
  converted: {variable path: (source key, array)} as a converter produced it (Flax layout).
  source_shapes: {source key: shape as stored}, for messages (a torch Linear is (out, in)).
  unmapped: source keys the converter could not place (errors unless dont_load matches them).
  new: regexes of param paths that start fresh (zero-initialised), e.g. a new head.
  dont_load: regexes, full-matched against source keys and param paths, of tensors to drop.
  """
  source_shapes = source_shapes or {}
  drop = lambda *names: any(matches(p, *names) for p in dont_load)
  is_new = lambda path: any(matches(p, path) for p in new)

  unexpected = [f'{key} {tuple(np.shape(a))}' for key, a in unmapped if not drop(key)]
  dropped = {key for key, _ in unmapped}
  mismatched, params = {}, {}  # mismatched: {target path: message}
  for path, (key, array) in converted.items():
    if drop(key, path) or is_new(path):
      dropped.add(key)
      continue
    if path not in target_shapes:
      unexpected.append(f'{key} {tuple(array.shape)} (would go to {path}, which the model lacks)')
      continue
    want = target_shapes[path]
    if tuple(array.shape) != tuple(want.shape):
      mismatched[path] = (f'{key} {source_shapes.get(key, tuple(array.shape))} -> {path} '
                          f'{tuple(want.shape)}')
      continue
    params[path] = jnp.asarray(array, dtype=dtype or want.dtype)

  missing = []
  for path, want in target_shapes.items():
    if path in params or path in mismatched:
      continue
    if is_new(path) or drop(path):
      params[path] = jnp.zeros(want.shape, dtype or want.dtype)
    else:
      missing.append(f'{path} {tuple(want.shape)}')

  problems = []
  if mismatched:
    problems.append(f'{len(mismatched)} shape mismatch(es) (source key -> param):'
                    + _listing(mismatched.values()))
  if missing:
    problems.append(f'{len(missing)} model variable(s) not in the checkpoint:' + _listing(missing))
  if unexpected:
    problems.append(f'{len(unexpected)} checkpoint tensor(s) the model has no place for (drop '
                    'them with dont_load=[regex]):' + _listing(unexpected))
  if problems:
    raise WeightsError(f'{source_name} does not fit the model:\n  ' + '\n  '.join(problems))
  return unflatten(params), sorted(dropped)


def target_shapes(module, *example_args) -> dict:
  """{variable path: ShapeDtypeStruct} of all the module's variables, without allocating them."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))
  return flatten(variables)


# Scanned layers (scan=True): per-layer source tensors stacked on a leading layer axis.
def stacked_key(keys):
  """'blocks.{0..11}.attn.proj.weight' for the per-layer source keys of one stacked param."""
  if len(set(keys)) == 1:
    return keys[0]
  bases = {re.sub(r'\[\d+\]$', '', k) for k in keys}
  if len(bases) == 1:  # Split from a scanned source: its own key.
    return bases.pop()
  pattern = re.sub(r'(?<=[._])0(?=[./\[]|$)', '{}', keys[0], count=1)
  if '{}' in pattern and all(k == pattern.format(i) for i, k in enumerate(keys)):
    return pattern.replace('{}', '{0..%d}' % (len(keys) - 1))
  return f'{keys[0]} ... {keys[-1]}'


def stack_layers(converted, num_layers, source_name, prefix='params/encoder/'):
  """Converted tensors at `<prefix>layer_{i}/<rest>` for i < num_layers -> one stacked tensor at
  `<prefix>layers/<rest>` (leading axis: the layer), for a model built with scan=True. Layers at
  or beyond num_layers stay as they are, so that merge reports them as unexpected."""
  out, by_rest = {}, {}
  pattern = re.compile(re.escape(prefix) + r'layer_(\d+)/(.+)')
  for path, value in converted.items():
    m = pattern.fullmatch(path)
    if m and int(m.group(1)) < num_layers:
      by_rest.setdefault(m.group(2), {})[int(m.group(1))] = value
    else:
      out[path] = value
  for rest, layers in by_rest.items():
    missing = [i for i in range(num_layers) if i not in layers]
    if missing:
      raise WeightsError(f'{source_name}: layer(s) {missing} lack {rest} (layer '
                         f'{min(layers)} has it: {layers[min(layers)][0]})')
    parts = [layers[i] for i in range(num_layers)]
    out[f'{prefix}layers/{rest}'] = (stacked_key([key for key, _ in parts]),
                                     np.stack([np.asarray(array) for _, array in parts]))
  return out
