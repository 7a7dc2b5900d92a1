"""Feature cache for linear probes: when only the head trains and its inputs never change, compute
the backbone's features (out['pre_logits']) once per split and train the head on them.

A linear probe on a fixed dataset recomputes the same frozen forward pass every epoch; with the
cache, epoch 1 pays for one inference pass over the train and test splits and later epochs cost
only the head's matmul. The run is the same run: the same batches in the same order (the cached
arrays keep the examples' order, so jaxtl.data.batches draws the same (seed, epoch) permutation),
the same optimizer over the same head params, the same dropout mask before the head, and the
train state keeps the full params, so checkpoints, resume, predict and export see the whole model.

`plan(...)` caches when all of these hold (else it returns None and the normal path runs):
  - every param outside the head (model.param_group(path)[0] != 'head') is frozen: the labels
    decide, not the scheme's name;
  - the inputs are fixed: image data with preprocess.augment == 'none' (its train view is then
    its eval view), or text data (no augmentation);
  - the backbone is deterministic in train mode, as train_step runs it: every BatchNorm runs on
    running statistics (bn_mode 'follow_freeze' or 'eval'), and no dropout, stochastic depth or
    other random op acts before out['pre_logits']. A dropout between pre_logits and the head
    (BERT's and MobileNetV2's classifier dropout) is applied by the cached head itself, under the
    model's name for it, so it draws the very mask the full model draws;
  - the head is one nn.Dense (kernel and bias) at a top-level path, fed by pre_logits: checked by
    tracing the model, and numerically on the first batch (a random head on the full model gives
    the logits that the cached head gives on the features).

config.feature_cache: 'auto' (default: in memory; on disk when the features pass AUTO_DISK_BYTES)
| 'memory' | 'disk' (<workdir>/feature_cache/<key>/{train,test}.npy, memory-mapped) | 'off'.
A disk cache is keyed by a hash of the model's fields, the backbone params and BatchNorm
statistics, the preprocessing and the input arrays, so a cache from another model, checkpoint,
preprocessing or dataset is never reused; an unfinished one (no meta.json) is recomputed.
"""
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import time
from typing import Optional

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import data as data_lib, freeze, parallel
from jaxtl.errors import ConfigError
from jaxtl.weights.strict import flatten

MODES = ('auto', 'memory', 'disk', 'off')
AUTO_DISK_BYTES = 4 * 2**30   # 'auto' keeps features up to this size in memory.
CACHE_DIR = 'feature_cache'
FORMAT = 1                    # Part of the disk key: bump when what is stored changes.


class NotApplicable(Exception):
  """Why the feature cache does not apply (the normal path runs)."""


@dataclasses.dataclass
class CachedData:
  """Stands in for ImageData / TextData: train and test hold 'features' [N, D] and 'label' [N] in
  the original order, so batches() draws the same examples per (seed, epoch)."""
  train: dict
  test: dict
  class_names: list

  def prepare(self, batch, **unused):
    return batch  # Features are model inputs as they are: nothing to augment or normalise.


class CachedHead(nn.Module):
  """The model's head alone: [its dropout ->] its Dense, under the model's names, so that its
  params are {head: {kernel, bias}} of the full params tree, and the dropout (a child of the root
  in both) derives the same rng. Same interface as the models: `(logits, out)`."""
  head: str                         # The Dense's name (its top-level param path), e.g. 'fc'.
  dense: dict                       # The model's nn.Dense fields (features, dtype, ...).
  dropout: Optional[dict] = None    # The model's nn.Dropout fields and 'name', when one acts.

  @nn.compact
  def __call__(self, features, train=False):
    x = features
    if self.dropout:
      fields = dict(self.dropout)
      x = nn.Dropout(name=fields.pop('name'), **fields)(x, deterministic=not train)
    logits = nn.Dense(name=self.head, **self.dense)(x)
    return logits.astype(jnp.float32), {'pre_logits': features}


@dataclasses.dataclass
class FeatureCache:
  """What `plan` returns: train with `module` and `data` in place of the model and its data; the
  train state keeps the full params (the cached head ignores the frozen ones)."""
  module: CachedHead
  data: CachedData
  head: str                         # Top-level param path of the head.
  mode: str                         # 'memory' | 'disk'
  directory: Optional[pathlib.Path] = None  # The disk cache's folder.
  reused: bool = False              # Read from an earlier run's disk cache.
  seconds: float = 0.0              # Time spent computing (or opening) the features.

  def head_params(self, params):
    """The head's params out of the full tree: the cached module's whole params tree."""
    return {self.head: params[self.head]}

  def merge(self, params, head_params):
    """The full tree with the head's params replaced by trained ones."""
    return {**params, self.head: head_params[self.head]}

  def labels(self, labels):
    """The labels restricted to the head (for an optimizer over head params only)."""
    return {self.head: labels[self.head]}


# ---------------------------------------------------------------------------------------------
# Does it apply?
# ---------------------------------------------------------------------------------------------
def _head_path(module, params, labels) -> str:
  """The head's top-level name, when everything else is frozen and the head is one Dense."""
  flat_labels = flatten(labels)
  head, trainable_outside = set(), []
  for path in flatten(params):
    try:
      group, _ = module.param_group(path)
    except (KeyError, AttributeError):
      raise NotApplicable(f'{type(module).__name__} gives no param group for {path!r}') from None
    if group == 'head':
      head.add(path)
    elif flat_labels[path] != freeze.FROZEN:
      trainable_outside.append(path)
  if trainable_outside:
    raise NotApplicable(f'{len(trainable_outside)} param(s) outside the head train, e.g. '
                        f'{trainable_outside[0]!r}')
  tops = {path.split('/')[0] for path in head}
  if len(tops) != 1 or {path.split('/', 1)[-1] for path in head} != {'kernel', 'bias'}:
    raise NotApplicable(f'the head is not one Dense (kernel, bias) at a top-level path: '
                        f'{sorted(head)}')
  (top,) = tops
  if all(flat_labels[path] == freeze.FROZEN for path in head):
    raise NotApplicable('the head is frozen too')
  return top


def _fixed_inputs(data):
  if not hasattr(data, 'prepare'):
    return  # Text: tokenised once, no augmentation.
  augment = getattr(getattr(data, 'preprocess', None), 'augment', None)
  if augment != 'none':
    raise NotApplicable(f'config.data.augment is {augment!r}: the inputs change every epoch '
                        "(augment='none' keeps them fixed)")


def _module_fields(module, drop=('parent', 'name')) -> dict:
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in drop}


def _trace(module, params, model_state, labels, bn_mode, head):
  """Traces the train-mode forward pass as train_step runs it (frozen parts in inference mode)
  without a dropout rng, so any random op the cache could not reproduce fails the trace. Returns
  (the head Dense's fields, the fields of the dropout between pre_logits and the head or None)."""
  from jaxtl import train as train_lib  # Not at the top: train.py imports this module.
  frozen_bns = train_lib.frozen_batchnorms(model_state, labels, bn_mode)
  inference_mode = train_lib._frozen_parts_in_inference_mode(frozen_bns,
                                                              train_lib.frozen_scopes(labels))
  seen = {'dropouts': [], 'dense': [], 'bn_train': []}

  def record(next_fun, args, kwargs, context):
    # Inside the inference-mode interceptor: sees only what train_step leaves in train mode.
    layer = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = '/'.join(layer.path)
    if isinstance(layer, nn.Dropout):
      deterministic = kwargs.get('deterministic', args[1] if len(args) > 1 else None)
      deterministic = layer.deterministic if deterministic is None else deterministic
      if layer.rate > 0 and not deterministic:
        x = args[0] if args else kwargs['inputs']
        # In its place a new value equal to x: the trace needs no rng (the cached head draws
        # the mask), and what reads the dropout's output can be told from what reads x.
        marked = x + 0
        seen['dropouts'].append((layer, x, marked))
        return marked
    elif isinstance(layer, nn.BatchNorm):
      running = kwargs.get('use_running_average', args[1] if len(args) > 1 else None)
      if not (layer.use_running_average if running is None else running):
        seen['bn_train'].append(path)
    elif isinstance(layer, nn.Dense) and path == head:
      seen['dense'].append((layer, args[0] if args else kwargs['inputs']))
    return next_fun(*args, **kwargs)

  def forward(params, model_state):
    with inference_mode, nn.intercept_methods(record):
      (_, out), _ = module.apply({'params': params, **model_state}, *module.example_inputs(),
                                 train=True, mutable=list(model_state))
    pre_logits = out.get('pre_logits') if isinstance(out, dict) else None
    # Identity checks between tracers of this one trace: which value feeds what.
    dropouts = [(layer, x is pre_logits) for layer, x, _ in seen['dropouts']]
    fed = seen['dropouts'][0][2] if len(seen['dropouts']) == 1 else pre_logits
    dense = [(layer, x is fed) for layer, x in seen['dense']]
    seen.update(dropouts=dropouts, dense=dense, has_pre_logits=pre_logits is not None)

  try:
    jax.eval_shape(forward, params, model_state)
  except flax.errors.InvalidRngError as e:
    raise NotApplicable(f'a random op other than the head dropout acts in the frozen backbone '
                        f'while training ({str(e).splitlines()[0][:160]})') from None
  if not seen['has_pre_logits']:
    raise NotApplicable("the model returns no out['pre_logits']")
  if seen['bn_train']:
    raise NotApplicable(f'BatchNorm {seen["bn_train"][0]!r} normalises with batch statistics '
                        f'while training (config.bn_mode = {bn_mode!r})')
  misplaced = [layer for layer, at_pre_logits in seen['dropouts'] if not at_pre_logits]
  if misplaced or len(seen['dropouts']) > 1:
    layer = (misplaced or [layer for layer, _ in seen['dropouts']])[0]
    raise NotApplicable(f'dropout {"/".join(layer.path)!r} (rate {layer.rate}) acts in train '
                        "mode on something other than out['pre_logits']")
  if len(seen['dense']) != 1 or type(seen['dense'][0][0]) is not nn.Dense:
    raise NotApplicable(f'the head {head!r} is not called once as an nn.Dense')
  dense, fed_by_pre_logits = seen['dense'][0]  # Directly, or through the one dropout.
  if not fed_by_pre_logits:
    raise NotApplicable(f"the head {head!r} does not read out['pre_logits']"
                        + (' through its dropout' if seen['dropouts'] else ''))
  dropout = None
  if seen['dropouts']:
    layer = seen['dropouts'][0][0]
    if len(layer.path) != 1:
      raise NotApplicable(f'the head dropout {"/".join(layer.path)!r} is not a child of the root')
    dropout = dict(_module_fields(layer, drop=('parent', 'name', 'deterministic')),
                   name=layer.name)
  return _module_fields(dense), dropout


# ---------------------------------------------------------------------------------------------
# Computing and storing features.
# ---------------------------------------------------------------------------------------------
def _model_inputs(batch):
  return {k: v for k, v in batch.items() if k not in ('label', 'mask')}


def _random_head(head_params, seed=0):
  """The head's params drawn at random (a new head is often all zeros, which checks nothing)."""
  rng = np.random.default_rng(seed)
  return {name: (rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0] if leaf.ndim > 1 else 1))
          .astype(leaf.dtype) for name, leaf in head_params.items()}  # Shapes only: no gather.


class _Writer:
  """Per split, an [N, D] array filled batch by batch: in memory, or a .npy file written under a
  temporary name (np.lib.format.open_memmap) and renamed once complete."""

  def __init__(self, directory):
    self.directory, self.arrays = directory, {}

  def array(self, split, shape, dtype):
    if split not in self.arrays:
      if self.directory is None:
        self.arrays[split] = np.empty(shape, dtype)
      else:
        self.arrays[split] = np.lib.format.open_memmap(
            self.directory / f'{split}.partial.npy', mode='w+', dtype=dtype, shape=shape)
    return self.arrays[split]

  def finish(self):
    if self.directory is None:
      return self.arrays
    for split, array in self.arrays.items():
      array.flush()
      os.replace(self.directory / f'{split}.partial.npy', self.directory / f'{split}.npy')
    return _open(self.directory)


def _open(directory):
  return {split: np.load(directory / f'{split}.npy', mmap_mode='r') for split in ('train', 'test')}


@functools.lru_cache(maxsize=2)
def _forward(module, mesh):
  """(pre_logits, logits) of a batch split along 'data', jitted once per model and mesh (a rerun
  or a second phase on the same model does not compile again)."""
  sharded = parallel.data_sharded(mesh)
  def forward(params, model_state, inputs):
    # Whole params on every device, whatever the state's sharding (replicated or FSDP).
    params = jax.lax.with_sharding_constraint(params, parallel.replicated(mesh))
    logits, out = module.apply({'params': params, **model_state}, **inputs, train=False)
    return out['pre_logits'], logits
  return jax.jit(forward, out_shardings=(sharded, sharded))


def _extract(module, params, model_state, data, head_module, head, batch_size, mesh, writer):
  """Every split's out['pre_logits'] in inference mode (train=False: frozen BN and dropout act as
  train_step runs them). On the first batch, the full model with a random head must give the
  logits that the cached head gives on the features, or the cache does not apply."""
  probe = _random_head(params[head])
  params = {**params, head: probe}
  forward = _forward(module, mesh)
  checked = False
  for split in ('train', 'test'):
    arrays = getattr(data, split)
    n, begin = data_lib.num_examples(arrays), 0
    for batch in data_lib.batches(arrays, batch_size):
      if hasattr(data, 'prepare'):
        batch = data.prepare(batch, train=False)
      features, logits = jax.device_get(forward(
          params, model_state, parallel.shard_batch(_model_inputs(batch), mesh)))
      if not checked:
        expect, _ = head_module.apply({'params': {head: probe}}, features, train=False)
        expect = np.asarray(expect)
        scale = float(np.max(np.abs(expect))) or 1.0
        if not np.allclose(logits, expect, rtol=1e-4, atol=1e-5 * scale):
          raise NotApplicable(f"the head on out['pre_logits'] does not give the model's logits "
                              f'(max difference {np.max(np.abs(logits - expect)):.3g})')
        checked = True
      real = min(batch_size, n - begin)
      writer.array(split, (n,) + features.shape[1:], features.dtype)[begin:begin + real] = (
          features[:real])
      begin += real
  return writer.finish()


def _describe_data(data) -> dict:
  if hasattr(data, 'preprocess'):
    return {'preprocess': repr(data.preprocess)}
  return {'max_length': getattr(data, 'max_length', None),
          'tokenizer_dir': str(getattr(data, 'tokenizer_dir', None))}


def cache_key(module, params, model_state, head, data) -> str:
  """A hash of everything the features depend on: the model's fields, the params outside the head
  and the other variable collections (BatchNorm statistics), the preprocessing, the inputs."""
  from jaxtl import run  # run.py imports checkpoint (orbax): only when a disk cache is asked for.
  h = hashlib.blake2b(digest_size=16)
  h.update(json.dumps({'format': FORMAT, 'model': run.model_spec(module), 'head': head,
                       'data': _describe_data(data)}, sort_keys=True, default=str).encode())

  def add(tree, prefix):
    for path, leaf in sorted(flatten(tree).items()):
      leaf = np.ascontiguousarray(jax.device_get(leaf))
      h.update(f'{prefix}/{path}:{leaf.dtype}:{leaf.shape};'.encode())
      h.update(leaf.view(np.uint8).reshape(-1).data if leaf.size else b'')

  add({k: v for k, v in params.items() if k != head}, 'params')
  add(model_state, 'state')
  for split in ('train', 'test'):
    add(_model_inputs(getattr(data, split)), split)
  return h.hexdigest()


def _feature_bytes(params, data, head) -> int:
  """The features' size (float32), from the head kernel's input width: pre_logits feed it."""
  width = params[head]['kernel'].shape[0]
  n = sum(data_lib.num_examples(getattr(data, split)) for split in ('train', 'test'))
  return n * width * 4


# ---------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------
def plan(config, phase, module, params, model_state, labels, data, *, workdir=None, mesh=None,
         verbose=True) -> Optional[FeatureCache]:
  """A FeatureCache when this phase's head can train on cached features (see the module
  docstring); None when it cannot (the reason is printed once the phase is a linear probe) or when
  config.feature_cache is 'off'. `params` / `model_state` are the values the phase starts from
  (after any resume); the features are computed here, so the call takes one inference pass."""
  mode = config.get('feature_cache') or 'auto'
  if mode not in MODES:
    raise ConfigError(f'config.feature_cache {mode!r} is not one of {", ".join(MODES)}')
  if mode == 'off':
    return None
  bn_mode = phase.get('bn_mode') or 'follow_freeze'
  say = print if verbose else (lambda *a: None)
  try:
    head = _head_path(module, params, labels)
  except NotApplicable as e:
    if mode != 'auto':  # Asked for by name: say why not. Otherwise a fine-tune needs no note.
      say(f'Feature cache not used: {e}')
    return None
  directory, reused = None, False
  try:
    _fixed_inputs(data)
    if set(model_state) - {'batch_stats'}:
      raise NotApplicable(f'the model has variable collections {sorted(model_state)} that may '
                          'change while training')
    dense, dropout = _trace(module, params, model_state, labels, bn_mode, head)
    head_module = CachedHead(head=head, dense=dense, dropout=dropout)
    if mode == 'auto':
      large = _feature_bytes(params, data, head) > AUTO_DISK_BYTES
      mode = 'disk' if large and workdir is not None else 'memory'
    t0 = time.time()
    if mode == 'disk':
      if workdir is None:
        raise ConfigError("config.feature_cache = 'disk' needs a workdir")
      directory = pathlib.Path(workdir) / CACHE_DIR / cache_key(module, params, model_state,
                                                                head, data)
      reused = (directory / 'meta.json').is_file()
      if not reused:
        shutil.rmtree(directory, ignore_errors=True)  # An unfinished earlier attempt.
        directory.mkdir(parents=True)
    if mesh is None:
      mesh = parallel.make_mesh((config.get('mesh') or {}).get('data'))
    if reused:
      features = _open(directory)
    else:
      features = _extract(module, params, model_state, data, head_module, head,
                          config.batch_size, mesh, _Writer(directory))
    for split in ('train', 'test'):
      n = data_lib.num_examples(getattr(data, split))
      if len(features[split]) != n:
        raise NotApplicable(f'{directory}/{split}.npy holds {len(features[split])} rows, not {n}')
    if directory is not None and not reused:
      (directory / 'meta.json').write_text(json.dumps({
          'head': head, 'dropout': dropout and dropout['rate'],
          'shape': {s: list(features[s].shape) for s in features},
          'dtype': str(features['train'].dtype), 'data': _describe_data(data)}, indent=2))
  except NotApplicable as e:
    if directory is not None and not reused:
      shutil.rmtree(directory, ignore_errors=True)
    say(f'Feature cache not used: {e}')
    return None

  cached = CachedData(
      train={'features': features['train'], 'label': data.train['label']},
      test={'features': features['test'], 'label': data.test['label']},
      class_names=data.class_names)
  cache = FeatureCache(module=head_module, data=cached, head=head, mode=mode, directory=directory,
                       reused=reused, seconds=time.time() - t0)
  n_train, width = len(features['train']), features['train'].shape[-1]
  size = sum(f.nbytes for f in features.values()) / 2**20
  where = f'on disk, {directory}' if directory is not None else 'in memory'
  say(f"Feature cache: the head trains on out['pre_logits'] ({n_train:,} train + "
      f"{len(features['test']):,} test x {width}, {size:,.1f} MiB {where}; "
      f"{'reused' if reused else 'computed'} in {cache.seconds:.1f} s"
      + (f', head dropout {dropout["rate"]}' if dropout else '') + ')')
  return cache
