"""Freezing as data: a scheme gives every param path a label; labels split the params into a
trainable and a frozen subtree; the optimizer and the gradient see only the trainable one.

A scheme is one of
  - a preset name, built on the model's block structure (`param_group(path)`: stem -> block 0 ...
    block N-1 -> neck -> head):
      full                  everything trains
      linear_probe          only the head trains
      last_n_blocks:N       the top N blocks, the neck and the head train
      bitfit                biases (and the head) train (Ben Zaken et al., 2022)
      norm_only             normalisation scales and biases (and the head) train
      layer_decay:D         everything trains; block i's LR is scaled by D**(N - i), the stem's by
                            D**(N + 1), neck and head by 1 (BEiT / timm layer-wise LR decay)
      gradual_unfreeze:K    ULMFiT: the head first, then one more block group from the top every K
                            epochs (or 'gradual_unfreeze:Ksteps'); see `unfreeze_phases`
      lora                  only LoRA adapters (jaxtl/lora.py) and the head train
  - rules: a list of (regex, label) pairs, first match wins, over '/'-joined paths, e.g.
    [('encoder/layer_[0-3]/.*', 'frozen'), ('.*', 'trainable')];
  - a function (path: str, leaf) -> label.

A label is 'frozen', or the name of a trainable group, optionally with an LR multiplier:
'trainable', 'head', 'block_3*0.42' (spelled `group_label('block_3', 0.42)`); a rule may also
give {'label': name, 'lr_mult': m}. Multipliers act inside the optax chain (`partition`), so they
hold under any schedule; config.optim.lr_mult={group: m} multiplies further. Presets label the
head 'head', so a new head can learn faster than the pretrained body. Coverage is checked: every
param gets a label, and every rule matches something.
"""
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl import ops
from jaxtl.errors import SchemeError
from jaxtl.weights.strict import flatten, unflatten

FROZEN = 'frozen'
TRAINABLE = 'trainable'
HEAD = 'head'
PRESETS = ('full', 'linear_probe', 'last_n_blocks:N', 'bitfit', 'norm_only', 'layer_decay:D',
           'gradual_unfreeze:K', 'lora')
NORMS = (ops.LayerNorm, nn.LayerNorm, nn.BatchNorm, nn.GroupNorm, nn.RMSNorm)


def group_label(group: str, lr_mult: float = 1.0) -> str:
  """The label of a trainable group whose LR is scaled by lr_mult."""
  if group == FROZEN or '*' in group:
    raise SchemeError(f'bad group name {group!r}')
  return group if lr_mult == 1.0 else f'{group}*{lr_mult:.12g}'


def parse_label(label: str):
  """(group, lr_mult) of a label."""
  group, star, mult = label.partition('*')
  try:
    return group, float(mult) if star else 1.0
  except ValueError:
    raise SchemeError(f'bad label {label!r}: expected "group" or "group*multiplier"') from None


def norm_modules(module) -> set:
  """'/'-joined paths of the module's normalisation layers, found by tracing `init` abstractly."""
  found = set()
  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, NORMS) and context.method_name == '__call__':
      found.add('/'.join(context.module.path))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: module.init(jax.random.key(0), *module.example_inputs()))
  return found


def _parse_preset(name):
  kind, _, arg = name.partition(':')
  valid = {'full': False, 'linear_probe': False, 'bitfit': False, 'norm_only': False,
           'lora': False, 'last_n_blocks': True, 'layer_decay': True, 'gradual_unfreeze': True}
  if kind not in valid or valid[kind] != bool(arg):
    raise SchemeError(f'unknown freeze scheme {name!r}; valid presets: {", ".join(PRESETS)}, '
                      'or a list of (regex, label) rules, or a function (path, leaf) -> label')
  return kind, arg


def _preset(name: str, module, phase=None) -> Callable[[str, Any], str]:
  kind, arg = _parse_preset(name)
  if module is None or not hasattr(module, 'param_group'):
    raise SchemeError(f'freeze scheme {name!r} needs the model (for its block structure)')
  blocks = module.num_blocks
  if kind == 'gradual_unfreeze':
    # Phase p trains the head and neck, then blocks from the top, then the stem.
    phase = 0 if phase is None else phase
    return _preset(f'last_n_blocks:{min(phase, blocks)}', module) if phase <= blocks else (
        _preset('full', module))
  if kind == 'last_n_blocks':
    n = int(arg) if arg.isdigit() else -1
    if not 0 <= n <= blocks:
      raise SchemeError(f'freeze scheme {name!r}: N must be an integer in [0, {blocks}] (the model '
                        f'has {blocks} blocks)')
  if kind == 'layer_decay':
    try:
      decay = float(arg)
    except ValueError:
      decay = -1.0
    if not 0 < decay <= 1:
      raise SchemeError(f'freeze scheme {name!r}: the decay must be a number in (0, 1]')
  norms = norm_modules(module) if kind == 'norm_only' else set()

  def label(path, leaf):
    group, index = module.param_group(path)
    if group == 'head':
      return HEAD
    if kind == 'full':
      return TRAINABLE
    if kind == 'last_n_blocks':
      trains = group == 'neck' or (group == 'block' and index >= blocks - int(arg))
      return TRAINABLE if trains else FROZEN
    if kind == 'bitfit':
      return TRAINABLE if path.rsplit('/', 1)[-1] == 'bias' else FROZEN
    if kind == 'norm_only':
      return TRAINABLE if path.rsplit('/', 1)[0] in norms else FROZEN
    if kind == 'lora':
      return TRAINABLE if path.endswith(('/lora_a', '/lora_b')) else FROZEN
    if kind == 'layer_decay':
      depth = {'stem': blocks + 1, 'block': blocks - (index or 0), 'neck': 0}[group]
      return group_label('stem' if group == 'stem' else f'{group}_{index}' if group == 'block'
                         else group, decay ** depth)
    return FROZEN  # linear_probe
  return label


def unfreeze_phases(scheme, module):
  """For 'gradual_unfreeze:K[steps]': (phase length K, unit 'epochs' | 'steps', number of phases);
  None for any other scheme. Phase p's labels: label_params(params, scheme, module, phase=p)."""
  if not (isinstance(scheme, str) and scheme.startswith('gradual_unfreeze')):
    return None
  _, arg = _parse_preset(scheme)
  match = re.fullmatch(r'(\d+)(steps|epochs)?', arg)
  if not match or int(match.group(1)) < 1:
    raise SchemeError(f'freeze scheme {scheme!r}: K must be a positive integer of epochs, or of '
                      f'steps as in "gradual_unfreeze:100steps"')
  return int(match.group(1)), match.group(2) or 'epochs', module.num_blocks + 2


def _rules(rules, paths) -> dict:
  compiled = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise SchemeError(f'bad freeze rule {rule!r}: expected (regex, label)')
    label = rule[1]
    if isinstance(label, dict):  # {'label': name, 'lr_mult': m}
      unknown = sorted(set(label) - {'label', 'lr_mult'})
      if unknown or 'label' not in label:
        raise SchemeError(f'bad freeze rule {rule!r}: options are {{"label": name, "lr_mult": m}}'
                          + (f'; unknown {unknown}' if unknown else ''))
      label = group_label(label['label'], float(label.get('lr_mult', 1.0)))
    try:
      compiled.append((re.compile(rule[0]), label))
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


def label_params(params, scheme, module=None, phase=None):
  """A pytree like `params` whose leaves are labels ('frozen' or a trainable group's label).

  `phase` selects the phase of a gradual_unfreeze scheme (default: the first)."""
  flat = flatten(params)
  if isinstance(scheme, str):
    scheme = _preset(scheme, module, phase)
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
  for label in set(labels.values()):
    parse_label(label)
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


def partition(make_tx: Callable[[str], optax.GradientTransformation], labels, lr_mult=None):
  """One optimizer over the trainable subtree: `make_tx(group)` per trainable group, its updates
  scaled by the label's multiplier times lr_mult.get(group, 1).

  Frozen params are not in that subtree at all, so they carry no optimizer state and no update
  can reach them (weight decay included). The scaling is an optax.scale at the end of each group's
  chain: it multiplies that group's learning rate under any schedule."""
  lr_mult = dict(lr_mult or {})
  train_labels = trainable_labels(labels)
  present = sorted(set(jax.tree_util.tree_leaves(train_labels)))
  names = sorted({parse_label(label)[0] for label in present})
  unknown = sorted(set(lr_mult) - set(names))
  if unknown:
    raise SchemeError(f'config.optim.lr_mult names group(s) {unknown} that the freeze scheme does '
                      f'not produce; its trainable groups: {names}')
  if not present:
    raise SchemeError('the freeze scheme leaves no param trainable')

  def make(label):
    group, mult = parse_label(label)
    mult *= lr_mult.get(group, 1.0)
    tx = make_tx(group)
    return tx if mult == 1.0 else optax.chain(tx, optax.scale(mult))

  if len(present) == 1:
    return make(present[0])
  return optax.partition({label: make(label) for label in present}, train_labels)


def carry_opt_state(old, new):
  """`new` (a fresh optimizer state) with every leaf that `old` has at the same path and shape
  taken from `old`: groups that were already training keep their moments and step counts when a
  phase unfreezes more params."""
  old_leaves = {jax.tree_util.keystr(path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(old)}
  def pick(path, leaf):
    prior = old_leaves.get(jax.tree_util.keystr(path))
    return prior if prior is not None and jnp.shape(prior) == jnp.shape(leaf) else leaf
  return jax.tree_util.tree_map_with_path(pick, new)


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
