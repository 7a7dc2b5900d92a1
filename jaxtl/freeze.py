"""Freezing as data: a scheme gives every param path a label; labels split the params into a
trainable and a frozen subtree; the optimizer and the gradient see only the trainable one.

A scheme is one of
  - a preset name: 'full', 'linear_probe' (only the head trains), 'last_n_blocks:N' (the top N
    blocks, the neck and the head train), using the model's `param_group(path)`;
  - rules: a list of (regex, label), first match wins, over '/'-joined paths, e.g.
    [('encoder/layer_[0-3]/.*', 'frozen'), ('.*', 'trainable')];
  - a function (path: str, leaf) -> label.
The label 'frozen' freezes; any other label names a trainable group (groups can get their own LR
multiplier, config.optim.lr_mult). Presets label the head 'head' and other trainable params
'trainable', so a new head can learn faster than the pretrained body. Coverage is checked: every
param gets a label, and every rule matches something.
"""
import re
from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxtl.errors import SchemeError
from jaxtl.weights.strict import flatten, unflatten

FROZEN = 'frozen'
TRAINABLE = 'trainable'
HEAD = 'head'
PRESETS = ('full', 'linear_probe', 'last_n_blocks:N')


def _preset(name: str, module) -> Callable[[str, Any], str]:
  kind, _, arg = name.partition(':')
  if kind not in ('full', 'linear_probe', 'last_n_blocks') or (kind == 'last_n_blocks') != bool(arg):
    raise SchemeError(f'unknown freeze scheme {name!r}; valid presets: {", ".join(PRESETS)}, '
                      'or a list of (regex, label) rules, or a function (path, leaf) -> label')
  if module is None or not hasattr(module, 'param_group'):
    raise SchemeError(f'freeze scheme {name!r} needs the model (for its block structure)')
  n = module.num_blocks
  if kind == 'last_n_blocks':
    try:
      n = int(arg)
    except ValueError:
      n = -1
    if not 0 <= n <= module.num_blocks:
      raise SchemeError(f'freeze scheme {name!r}: N must be an integer in [0, '
                        f'{module.num_blocks}] (the model has {module.num_blocks} blocks)')
  first = module.num_blocks - n  # Blocks from `first` on train.

  def label(path, leaf):
    group, index = module.param_group(path)
    if group == 'head':
      return HEAD
    trains = kind == 'full' or (kind == 'last_n_blocks' and (
        group == 'neck' or (group == 'block' and index >= first)))
    return TRAINABLE if trains else FROZEN
  return label


def _rules(rules, paths) -> dict:
  compiled = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise SchemeError(f'bad freeze rule {rule!r}: expected (regex, label)')
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise SchemeError(f'bad freeze rule regex {rule[0]!r}: {e}') from None
  labels, used = {}, set()
  for path in paths:
    for i, (pattern, label) in enumerate(compiled):
      if pattern.fullmatch(path):
        labels[path] = label
        used.add(i)
        break
  unused = [rules[i][0] for i in range(len(rules)) if i not in used]
  if unused:
    raise SchemeError(f'freeze rule(s) {unused} match no param (rules are full-matched, first '
                      f'match wins); some real paths: {_examples(paths)}')
  return labels


def _examples(paths, k=6):
  paths = list(paths)
  picks = paths if len(paths) <= k else [paths[int(i)] for i in np.linspace(0, len(paths) - 1, k)]
  return ', '.join(picks)


def label_params(params, scheme, module=None):
  """A pytree like `params` whose leaves are labels ('frozen' or a trainable group name)."""
  flat = flatten(params)
  if isinstance(scheme, str):
    scheme = _preset(scheme, module)
  if callable(scheme):
    labels = {path: scheme(path, leaf) for path, leaf in flat.items()}
  elif isinstance(scheme, (list, tuple)):
    labels = _rules(scheme, flat)
  else:
    raise SchemeError(f'a freeze scheme is a preset name, a list of (regex, label) rules or a '
                      f'function; got {type(scheme).__name__}')
  uncovered = [p for p in flat if labels.get(p) is None]
  if uncovered:
    raise SchemeError(f'freeze scheme leaves {len(uncovered)} param(s) without a label, e.g. '
                      f'{_examples(uncovered, 4)}; add a rule for them (such as (".*", '
                      f'"{TRAINABLE}") last)')
  bad = {l for l in labels.values() if not isinstance(l, str)}
  if bad:
    raise SchemeError(f'freeze labels must be strings; got {sorted(map(repr, bad))}')
  return unflatten(labels)


def split(params, labels):
  """(trainable, frozen): two nested dicts holding disjoint subsets of the leaves."""
  flat, flat_labels = flatten(params), flatten(labels)
  trainable = {p: v for p, v in flat.items() if flat_labels[p] != FROZEN}
  frozen = {p: v for p, v in flat.items() if flat_labels[p] == FROZEN}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable, frozen):
  return unflatten({**flatten(frozen), **flatten(trainable)})


def trainable_labels(labels):
  return split(labels, labels)[0]


def partition(make_tx: Callable[[str], optax.GradientTransformation], labels):
  """One optimizer over the trainable subtree: `make_tx(group)` per trainable group.

  Frozen params are not in that subtree at all, so they carry no optimizer state and no update
  can reach them (weight decay included)."""
  groups = sorted(set(flatten(trainable_labels(labels)).values()))
  if not groups:
    raise SchemeError('the freeze scheme leaves no param trainable')
  if len(groups) == 1:
    return make_tx(groups[0])
  return optax.partition({g: make_tx(g) for g in groups}, trainable_labels(labels))


def _nbytes(tree):
  return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
             for x in jax.tree_util.tree_leaves(tree) if hasattr(x, 'dtype'))


def summary(params, labels, opt_state=None) -> str:
  """A table of param counts per label, and the optimizer state's size."""
  flat, flat_labels = flatten(params), flatten(labels)
  total = sum(int(np.prod(x.shape)) for x in flat.values())
  counts = {}
  for path, leaf in flat.items():
    n, t = counts.get(flat_labels[path], (0, 0))
    counts[flat_labels[path]] = (n + int(np.prod(leaf.shape)), t + 1)
  rows = [('label', 'params', 'share', 'tensors')]
  for label in sorted(counts, key=lambda l: (l == FROZEN, l)):
    n, t = counts[label]
    rows.append((label, f'{n:,}', f'{100 * n / max(total, 1):.1f}%', str(t)))
  rows.append(('total', f'{total:,}', '100.0%', str(len(flat))))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(row, widths))) for row in rows]
  lines.insert(1, '-' * len(lines[0]))
  if opt_state is not None:
    lines.append(f'optimizer state: {_nbytes(opt_state) / 2**20:,.2f} MiB '
                 f'(frozen params have none)')
  return '\n'.join(lines)
