"""Training: a TrainState pytree, one jitted train step over a device mesh, an eval step, and the
loop `train_and_evaluate(config, workdir)` that ties data, model, freezing and checkpoints."""
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from jaxtl import (checkpoint, data as data_lib, feature_cache, freeze, lora, metrics, models,
                   parallel, plots, run, weights)
from jaxtl.data import images as image_data, text as text_data
from jaxtl.errors import ConfigError, JaxtlError
from jaxtl.host_memory import glibc_function, release_freed_host_memory


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any            # All params, trainable and frozen.
  model_state: Any       # Other variable collections (e.g. batch_stats); {} for BERT.
  opt_state: Any         # State for the trainable subtree only.
  rng: jax.Array


# ---------------------------------------------------------------------------------------------
# Model and optimizer.
# ---------------------------------------------------------------------------------------------
def create_model(config, num_classes, mesh=None):
  """(module, variables) from config.model: a pretrained `source` (host arrays, as read), or a
  registry `name` (random, initialised on the devices: with a `mesh`, straight into the
  shardings config.mesh gives the train state, e.g. FSDP's 1/N per device); with LoRA adapters
  when config.model.lora.rank > 0."""
  mc = config.model
  overrides = dict(mc.get('overrides') or {})
  if mc.get('source'):
    module, variables = weights.load_pretrained(
        mc.source, arch=mc.get('arch') or None, num_classes=num_classes,
        dont_load=tuple(mc.get('dont_load') or ()), overrides=overrides)
  elif mc.get('name'):
    module = models.create(mc.name, num_classes=num_classes, **overrides)
    shardings = None
    if mesh is not None:
      def shardings(abstract):  # By the paths that parallel.create_state gives the variables.
        abstract = dict(abstract)
        params = abstract.pop('params')
        state = parallel.state_shardings(dict(params=params, model_state=abstract), mesh,
                                         config.get('mesh'), check_rules=False)
        return dict(params=state['params'], **state['model_state'])
    variables = flax.core.unfreeze(models.init(module, config.seed, shardings))
  else:
    raise ConfigError('config.model needs `source` (pretrained weights) or `name` (a registry '
                      f'model: {", ".join(sorted(models.REGISTRY))})')
  adapters = dict(mc.get('lora') or {})
  if adapters.get('rank'):
    module, variables = lora.add_adapters(module, variables, seed=config.seed, **adapters)
    n_adapter, n_total = lora.count(variables)
    print(f'LoRA: {n_adapter:,} adapter params ({100 * n_adapter / n_total:.2f}% of {n_total:,})')
  return module, variables


def make_schedule(optim, total_steps):
  warmup = optim.get('warmup_steps') or int(optim.get('warmup_fraction', 0.0) * total_steps)
  decay_steps = max(total_steps - warmup, 1)
  kind = optim.get('schedule', 'linear')
  if kind == 'linear':
    decay = optax.linear_schedule(optim.lr, 0.0, decay_steps)
  elif kind == 'cosine':
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps)
  elif kind == 'constant':
    decay = optax.constant_schedule(optim.lr)
  else:
    raise ConfigError(f'config.optim.schedule {kind!r} is not one of linear, cosine, constant')
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def _decay_mask(params):
  # Weight decay on matrices only: never on biases or normalisation scales (all 1-D).
  return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)


def make_optimizer(optim, labels, total_steps):
  """Clipping over the trainable subtree, then one optimizer per trainable group."""
  schedule = make_schedule(optim, total_steps)
  name = optim.get('name', 'adamw')

  # mu_dtype 'bfloat16' keeps the first moment (Adam's mu, SGD's momentum) in bf16: half its
  # memory. Adam's second moment stays float32: with b2 = 0.999 a step changes it by ~0.1 %,
  # below bf16's resolution (0.4 %), so stored in bf16 most of its updates would round away.
  mu_dtype = optim.get('mu_dtype') or None
  if mu_dtype is not None:
    try:
      is_float = jnp.issubdtype(jnp.dtype(mu_dtype), jnp.floating)
    except TypeError:  # Not a dtype name at all.
      is_float = False
    if not is_float:
      raise ConfigError(f'config.optim.mu_dtype {mu_dtype!r} is not a float dtype such as '
                        "'bfloat16' or 'float32' ('' keeps the params' dtype)")

  def make_tx(group):  # The same optimizer for every group; partition scales each group's LR.
    if name == 'adamw':
      return optax.adamw(schedule, b1=optim.get('b1', 0.9), b2=optim.get('b2', 0.999),
                         eps=optim.get('eps', 1e-8), weight_decay=optim.get('weight_decay', 0.0),
                         mu_dtype=mu_dtype, mask=_decay_mask)
    if name == 'sgd':
      return optax.chain(optax.add_decayed_weights(optim.get('weight_decay', 0.0), _decay_mask),
                         optax.sgd(schedule, momentum=optim.get('momentum', 0.9) or None,
                                   nesterov=optim.get('nesterov', False),
                                   accumulator_dtype=mu_dtype))
    raise ConfigError(f'config.optim.name {name!r} is not one of adamw, sgd')

  tx = freeze.partition(make_tx, labels, optim.get('lr_mult'))
  if optim.get('clip_norm'):
    tx = optax.chain(clip_by_global_norm(optim.clip_norm), tx)
  return tx, schedule


def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
  """Scales the gradients by min(1, max_norm / global norm), as PyTorch's clip_grad_norm_ does.

  optax.clip_by_global_norm clips the same, but per leaf, as a select between g and
  g / norm * max_norm: XLA materialises that clipped copy of every gradient, which AdamW's two
  moment updates then read besides g. One scalar factor fuses into the moment updates instead:
  BERT-base's update (clipping and AdamW, 110 M params) takes 223 ms, not 272 (no clipping: 192)."""
  def update(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
    return jax.tree_util.tree_map(lambda g: (g * factor).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------
def _model_inputs(batch):
  return {k: v for k, v in batch.items() if k not in ('label', 'mask')}


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


BN_MODES = ('follow_freeze', 'train', 'eval')


def frozen_batchnorms(model_state, labels, bn_mode='follow_freeze') -> frozenset:
  """Paths ('layer1/block_0/bn1') of the BatchNorm layers that run on their running statistics,
  and never update them, while training: those whose scale is frozen ('follow_freeze', Keras
  semantics), all of them ('eval') or none ('train', PyTorch's model.train())."""
  if bn_mode not in BN_MODES:
    raise ConfigError(f'config.bn_mode {bn_mode!r} is not one of {", ".join(BN_MODES)}')
  bns = {path.rsplit('/', 1)[0] for path in freeze.flatten(model_state.get('batch_stats', {}))}
  if bn_mode != 'follow_freeze':
    return frozenset(bns if bn_mode == 'eval' else ())
  flat_labels = freeze.flatten(labels)
  return frozenset(bn for bn in bns if flat_labels.get(f'{bn}/scale', flat_labels.get(
      f'{bn}/bias')) == freeze.FROZEN)


def frozen_scopes(labels) -> frozenset:
  """Module paths ('encoder/layer_0/attention', '' for the root) that count as frozen: all their
  params are frozen, or the params they hold directly (not in sub-modules) are — as a ViT's root,
  whose class token and position embeddings are frozen while its head trains."""
  subtree, direct = {}, {}
  for path, label in freeze.flatten(labels).items():
    parts = path.split('/')[:-1]
    for depth in range(len(parts) + 1):
      scope = '/'.join(parts[:depth])
      subtree[scope] = subtree.get(scope, True) and label == freeze.FROZEN
    scope = '/'.join(parts)
    direct[scope] = direct.get(scope, True) and label == freeze.FROZEN
  return frozenset(s for s in subtree if subtree[s] or direct.get(s, False))


def _frozen_parts_in_inference_mode(frozen_bns, frozen_dropout_scopes):
  """A Flax interceptor: the listed BatchNorm layers normalise with their running statistics (and
  so leave them as they are), and dropout and stochastic depth inside a wholly frozen module are
  the identity, as in
  Keras' `base_model(x, training=False)`: a frozen part computes the features it computes at
  inference. Models call BN as bn(x, use_running_average=not train), which this overrides per
  layer; no model needs to know about freezing."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__':
      if isinstance(module, nn.BatchNorm) and '/'.join(module.path) in frozen_bns:
        kwargs = {**kwargs, 'use_running_average': True}
      elif (isinstance(module, nn.Dropout)
            and '/'.join(module.path[:-1]) in frozen_dropout_scopes):
        return args[0] if args else kwargs['inputs']
    elif context.method_name == 'drop_path' and '/'.join(module.path) in frozen_dropout_scopes:
      return args[0]  # Stochastic depth (ViT blocks' drop_path(ys, rate, train)) of a frozen block.
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(intercept)


def train_step(state, batch, *, module, tx, labels, frozen_bns=frozenset(), accum_steps=1):
  """One update. Only the trainable subtree is differentiated: frozen params enter the loss as
  constants, so no backward pass runs through a frozen prefix. BatchNorm layers in `frozen_bns`
  and dropout inside frozen modules run in inference mode.

  accum_steps = k > 1: the batch is split into k micro-batches whose gradients are averaged (one
  scan, so memory holds one micro-batch's activations); BatchNorm statistics update k times.

  A non-finite loss or gradient leaves params, optimizer and model state as they were (the step
  count moves on); metrics['finite'] tells the loop, which stops or skips (config.on_nonfinite)."""
  trainable, frozen = freeze.split(state.params, labels)
  inference_mode = _frozen_parts_in_inference_mode(frozen_bns, frozen_scopes(labels))
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  mutable = list(state.model_state)

  def loss_fn(trainable, model_state, batch, rng):
    variables = {'params': freeze.merge(trainable, frozen), **model_state}
    with inference_mode:
      (logits, _), new_model_state = module.apply(
          variables, **_model_inputs(batch), train=True, rngs={'dropout': rng}, mutable=mutable)
    return cross_entropy(logits, batch['label']).mean(), (logits, new_model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, (logits, model_state)), grads = grad_fn(trainable, state.model_state, batch,
                                                   dropout_rng)
  else:
    # Micro-batch i takes rows i, i + k, i + 2k, ...: every device keeps its own rows.
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, inputs):
      grads, model_state = carry
      index, micro_batch = inputs
      (loss, (logits, model_state)), g = grad_fn(trainable, model_state, micro_batch,
                                                 jax.random.fold_in(dropout_rng, index))
      return (jax.tree_util.tree_map(jnp.add, grads, g), model_state), (loss, logits)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    (grads, model_state), (losses, logits) = jax.lax.scan(
        accumulate, (zeros, state.model_state), (jnp.arange(accum_steps), micro))
    grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
    loss = losses.mean()
    # Accuracy over all micro-batches: logits and labels in the same (micro-batch-major) order.
    logits, batch = logits.reshape((-1,) + logits.shape[2:]), {'label': micro['label'].reshape(-1)}
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # One branch for the whole update, not a per-leaf jnp.where(finite, new, old): the selects
  # cost a pass over every param and moment, and ~1 s of compile for BERT-base (a 3-6 % faster
  # step, benchmarks/README.md).
  def update(trainable, opt_state, model_states):
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, model_states[0]

  def keep(trainable, opt_state, model_states):
    return trainable, opt_state, model_states[1]
  trainable, opt_state, model_state = jax.lax.cond(
      finite, update, keep, trainable, state.opt_state, (model_state, state.model_state))
  new_state = state.replace(
      step=state.step + 1, params=freeze.merge(trainable, frozen), model_state=model_state,
      opt_state=opt_state)
  return new_state, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                     'grad_norm': grad_norm, 'finite': finite}


# glibc's malloc for a process where XLA:CPU runs the steps (host_malloc_environment says why).
HOST_MALLOC_TUNABLES = {'glibc.malloc.arena_max': '1', 'glibc.malloc.mmap_max': '0',
                        'glibc.malloc.trim_threshold': str(2**64 - 1),
                        'glibc.malloc.tcache_count': '0'}


def host_malloc_environment(environ=None):
  """`environ` (default os.environ) with HOST_MALLOC_TUNABLES added to GLIBC_TUNABLES (settings
  already there win), so that glibc's malloc keeps the memory a step frees for the next step;
  None where jax may use an accelerator or the C library is not glibc.

  Why: XLA:CPU allocates a step's temporaries as one block when the step runs and frees it at the
  end (1.4-1.6 GiB for the full fine-tune of ResNet-50 or ViT-B/16 at batch 8). glibc serves a
  block that large with mmap and returns it with munmap, so every step page-faults all of it in
  again, zero-filled: ~380,000 faults and ~1.3 CPU-seconds of a ResNet-50 step on 2 cores. With
  one arena (a worker thread's own arena could only mmap a block that large), no mmap and no
  automatic trimming, the block stays in the heap for the next step: ResNet-50's full step ~0.8x
  its time (benchmarks/README.md). And with no per-thread cache of small freed chunks: XLA asks
  for the block 64-byte aligned, and glibc frees the few bytes it cuts off either end of an
  aligned block into that cache, whose chunks never merge with their neighbours; the freed block,
  walled in by them, is then those bytes too small for the next step's request, and the heap
  grew by a whole block at random steps (ResNet-50's full step: +1.4 GiB at its 7th step). The
  cost: the process keeps its peak heap until it exits (release_freed_host_memory trims
  explicitly), and one arena serialises malloc across threads, which is why an accelerator host,
  whose input pipeline allocates from many threads and whose step temporaries live on the device,
  is left alone. glibc reads these settings only when a process starts: exec_with_host_malloc."""
  environ = dict(os.environ if environ is None else environ)
  if jax.config.jax_platforms:
    if jax.config.jax_platforms != 'cpu':
      return None
  elif (importlib.util.find_spec('jax_plugins') or importlib.util.find_spec('libtpu')
        or list(importlib.metadata.entry_points(group='jax_plugins'))):
    return None  # jax would pick an accelerator if one is present.
  if glibc_function('gnu_get_libc_version') is None:
    return None
  given = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  names = {t.split('=')[0] for t in given}
  ours = [f'{name}={value}' for name, value in HOST_MALLOC_TUNABLES.items() if name not in names]
  environ['GLIBC_TUNABLES'] = ':'.join(given + ours)
  return environ


def exec_with_host_malloc():
  """Restarts this Python process under host_malloc_environment() (os.execve: the same process
  id, interpreter and command line), unless it runs under it already or it does not apply, and
  where it applies, turns jax's asynchronous dispatch on the CPU off. Call it first thing in a
  script, before jax starts its CPU backend: what the process did before is lost, and so are the
  descriptors it opened (Python opens them close-on-exec)."""
  environ = host_malloc_environment()
  if environ is None:
    return
  if environ['GLIBC_TUNABLES'] != os.environ.get('GLIBC_TUNABLES'):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)
  # With asynchronous dispatch, XLA:CPU reports a step's outputs ready before it frees the step's
  # temporaries, so the next step, dispatched at once, can allocate its block while the last one is
  # still held: the heap grew by a whole block now and then (ViT-B/16's full step: +1.55 GiB at
  # its 3rd step, twice in 9 steps; benchmarks/README.md). Run inline, a step has freed its block
  # before the next one asks.
  jax.config.update('jax_cpu_enable_async_dispatch', False)


def eval_step(state, batch, *, module):
  """Sums over the real (mask = 1) examples of a padded batch."""
  variables = {'params': state.params, **state.model_state}
  logits, _ = module.apply(variables, **_model_inputs(batch), train=False)
  mask, predictions = batch['mask'], jnp.argmax(logits, -1)
  return {'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
          'correct': jnp.sum((predictions == batch['label']) * mask),
          'count': jnp.sum(mask),
          'confusion_matrix': metrics.confusion_matrix(batch['label'], predictions,
                                                       logits.shape[-1], mask)}


def _prepare(data, batch, **kwargs):
  """Image data keeps uint8 pixels and augments / normalises per batch; text batches are ready."""
  return data.prepare(batch, **kwargs) if hasattr(data, 'prepare') else batch


def evaluate(p_eval_step, state, data, batch_size, mesh):
  totals = None
  for batch in data_lib.batches(data.test, batch_size):
    batch = _prepare(data, batch, train=False)
    out = p_eval_step(state, parallel.shard_batch(batch, mesh))
    if totals is None:
      release_freed_host_memory()  # The first batch may have compiled the eval step.
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {'loss': float(totals['loss'] / totals['count']),
          'accuracy': float(totals['correct'] / totals['count']),
          'confusion_matrix': np.rint(totals['confusion_matrix']).astype(np.int64)}


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def load_data(config):
  if config.data.kind not in image_data.KINDS + text_data.KINDS:
    raise ConfigError(f'config.data.kind {config.data.kind!r} is not one of '
                      f'{", ".join(image_data.KINDS + text_data.KINDS)}')
  if config.data.kind in image_data.KINDS:
    # Normalisation, input size and crop come with the weights (config.data fields override).
    source = config.model.get('source')
    cfg = weights.pretrained_cfg(source, arch=config.model.get('arch') or None) if source else None
    return image_data.load(config.data, cfg, seed=config.seed)
  if config.data.kind != 'synthetic' and not config.model.get('source'):
    if not config.data.get('tokenizer'):
      raise ConfigError('config.data.tokenizer is needed when config.model has no pretrained source')
  tokenizer_dir = (pathlib.Path(config.data.tokenizer) if config.data.get('tokenizer') else
                   weights.resolve(config.model.source) if config.data.kind != 'synthetic' else
                   None)
  if tokenizer_dir is not None and tokenizer_dir.is_file():
    tokenizer_dir = tokenizer_dir.parent
  return text_data.load(config.data, tokenizer_dir, seed=config.seed)


def _check_workdir(workdir) -> pathlib.Path:
  """Fails early if `workdir` cannot be written, without creating anything."""
  workdir = pathlib.Path(workdir)
  existing = next(p for p in [workdir, *workdir.absolute().parents] if p.exists())
  if not existing.is_dir():
    raise ConfigError(f'--workdir {workdir}: not writable ({existing} is a file)')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'--workdir {workdir}: not writable (no write permission on {existing})')
  return workdir


def _prepare_workdir(workdir) -> pathlib.Path:
  workdir = _check_workdir(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--workdir {workdir}: cannot be created ({e.strerror})') from None
  return workdir


PHASE_FIELDS = ('freeze', 'optim', 'num_epochs', 'bn_mode')


def phases_of(config) -> list:
  """The training phases: `config.phases`, a list of dicts that each set some of freeze, optim,
  num_epochs, bn_mode (the rest come from the top level), or the top-level config as one phase.

  Each phase starts a fresh optimizer (and schedule) over its own trainable params; params and
  BatchNorm statistics carry over. E.g. the classic transfer recipe: a frozen base with a new head
  trained by Adam, then the top blocks unfrozen and trained on by SGD at a low learning rate."""
  top = dict(freeze=config.get('freeze'), optim=config.get('optim'),
             num_epochs=config.get('num_epochs'), bn_mode=config.get('bn_mode') or 'follow_freeze')
  phases = []
  for i, phase in enumerate(config.get('phases') or [{}]):
    phase = dict(phase)
    unknown = sorted(set(phase) - set(PHASE_FIELDS))
    if unknown:
      raise ConfigError(f'config.phases[{i}] has unknown field(s) {unknown}; a phase sets '
                        f'{", ".join(PHASE_FIELDS)}')
    merged = ml_collections.ConfigDict({**top, **phase})
    for field in PHASE_FIELDS:
      if merged.get(field) is None:
        raise ConfigError(f'config.phases[{i}].{field} (or config.{field}) is missing')
    phases.append(merged)
  return phases


def _segments(phases, ends, module, steps_per_epoch):
  """(begin, end, phase index, unfreeze step or None): the stretches of steps that each train one
  set of params. A gradual_unfreeze phase splits into one stretch per unfreezing step; the last
  one runs to the end of the phase."""
  for index, phase in enumerate(phases):
    begin, end = (ends[index - 1] if index else 0), ends[index]
    gradual = freeze.unfreeze_phases(phase.freeze.scheme, module)
    if gradual is None:
      yield begin, end, index, None
      continue
    every, unit, count = gradual
    length = every * (steps_per_epoch if unit == 'epochs' else 1)
    for unfreeze in range(count):
      start = begin + unfreeze * length
      if start >= end:
        break
      yield start, (end if unfreeze == count - 1 else min(end, start + length)), index, unfreeze


class StopRequests:
  """While training, SIGTERM and SIGINT (Ctrl-C) ask the loop to finish its step, save a
  checkpoint and return, so that a preempted or interrupted run resumes with the same command. A
  second signal acts as it normally would."""

  def __init__(self):
    self.received, self._previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Only there can Python set them.
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def agreed(self, step, every) -> bool:
    """Whether to stop after `step`. With several processes (multi-host), every one of them must
    stop at the same step, so they compare flags every `every` steps (a signal may reach only
    some of them)."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    if flags.any() and self.received is None:
      self.received = 'a signal to another process'
    return bool(flags.any())

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signal.Signals(signum).name
      return
    signal.signal(signum, self._previous.pop(signum))
    os.kill(os.getpid(), signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config, workdir) -> dict:
  """Trains per `config`, phase by phase, evaluating on the test split each epoch; returns the
  final metrics."""
  t_start = time.time()
  _check_workdir(workdir)
  on_nonfinite = config.get('on_nonfinite') or 'stop'
  if on_nonfinite not in ('stop', 'skip'):
    raise ConfigError(f'config.on_nonfinite {on_nonfinite!r} is not stop or skip')
  accum_steps = config.get('grad_accum_steps') or 1
  data = load_data(config)
  num_classes = len(data.class_names)
  mesh = parallel.make_mesh(config.get('mesh', {}).get('data'))
  parallel.check_batch_size(config.batch_size, mesh)
  module, variables = create_model(config, num_classes, mesh)
  params = variables.pop('params')
  model_state = variables  # e.g. batch_stats; {} for BERT.

  if config.batch_size % (accum_steps * mesh.devices.size):
    raise ConfigError(f'config.batch_size = {config.batch_size} is not divisible by '
                      f'config.grad_accum_steps = {accum_steps} times the {mesh.devices.size} '
                      'devices')
  n_train = data_lib.num_examples(data.train)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'config.batch_size = {config.batch_size} is larger than the '
                      f'{n_train} training examples')
  phases = phases_of(config)
  # Phase i covers the global steps (ends[i - 1], ends[i]].
  ends = np.cumsum([phase.num_epochs * steps_per_epoch for phase in phases]).tolist()
  total_steps = ends[-1]
  for begin, end, index, unfreeze in _segments(phases, ends, module, steps_per_epoch):
    # Every phase's scheme, optimizer and BN mode are checked before the workdir is written.
    phase = phases[index]
    labels = freeze.label_params(params, phase.freeze.scheme, module, phase=unfreeze)
    make_optimizer(phase.optim, labels, max(ends[index] - (ends[index - 1] if index else 0), 1))
    frozen_batchnorms(model_state, labels, phase.bn_mode)

  workdir = _prepare_workdir(workdir)
  ckpt = checkpoint.manager(workdir)
  latest = ckpt.latest_step() or 0
  if latest > total_steps:
    raise ConfigError(f'{ckpt.directory}/{latest}: the run in --workdir {workdir} went past this '
                      f'config\'s {total_steps} steps; use a new --workdir, or raise '
                      'config.num_epochs to go on')
  if parallel.is_primary():  # Multi-host: one process writes the plain files.
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    (workdir / 'classes.json').write_text(json.dumps(data.class_names))
    run.write(workdir, module, data.class_names, data)

  repl = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharded(mesh)
  # The state comes in the shardings it was created in (replicated, or FSDP-sharded); the step
  # computes on all-gathered params (parallel.gather_params).
  p_eval_step = jax.jit(lambda s, b: eval_step(parallel.gather_params(s, mesh), b, module=module),
                        out_shardings=repl)
  writer, table = metrics.MetricWriter(workdir), metrics.EpochTable()  # Process 0 writes.
  bar = metrics.progress(total_steps, min(latest, total_steps), 'train')
  step, result, state, skipped = 0, {}, None, 0

  def check_finite(checked_step, finite, loss):
    """Acts on a step's `finite` flag; read one step late, so the host never waits for it."""
    nonlocal skipped
    if bool(finite):
      return
    loss = float(loss)
    if on_nonfinite == 'stop':
      kept = ckpt.latest_step()
      raise JaxtlError(
          f'step {checked_step}: non-finite loss or gradient (loss {loss}); the run stopped and '
          + (f'its last good checkpoint {ckpt.directory}/{kept} is kept' if kept is not None
             else 'no checkpoint was written yet')
          + '; lower config.optim.lr, check the data, or set config.on_nonfinite = "skip"')
    skipped += 1
    tqdm.tqdm.write(f'step {checked_step}: non-finite loss or gradient (loss {loss}); update '
                    'skipped (config.on_nonfinite = skip)')

  # The event file and the progress bar are closed however the loop ends.
  with StopRequests() as stop, writer, bar:
    for begin, end, index, unfreeze in _segments(phases, ends, module, steps_per_epoch):
      if latest > end:  # Finished before a restart; a later checkpoint holds what it did.
        continue
      phase = phases[index]
      phase_begin = ends[index - 1] if index else 0
      labels = freeze.label_params(params, phase.freeze.scheme, module, phase=unfreeze)
      tx, schedule = make_optimizer(phase.optim, labels, ends[index] - phase_begin)
      frozen_bns = frozen_batchnorms(model_state, labels, phase.bn_mode)

      def init_state(params, model_state, opt_state):
        fresh = tx.init(freeze.split(params, labels)[0])
        if opt_state is not None:  # Gradual unfreezing: groups already training go on.
          fresh = freeze.carry_opt_state(opt_state, fresh)
        return TrainState(step=jnp.asarray(begin, jnp.int32), params=params,
                          model_state=model_state, opt_state=fresh,
                          rng=jax.random.PRNGKey(config.seed))
      # Built in its shardings (config.mesh: replicated, or FSDP), never whole on one device.
      state, state_sharding = parallel.create_state(
          init_state, dict(params=params, model_state=model_state,
                           opt_state=state.opt_state if unfreeze and state is not None else None),
          mesh, config.get('mesh'))
      if len(phases) > 1 or unfreeze is not None:
        print(f'Phase {index + 1}/{len(phases)}'
              + (f', unfreezing step {unfreeze + 1}' if unfreeze is not None else '')
              + f': freeze {phase.freeze.scheme!r}, {phase.optim.get("name", "adamw")} lr '
                f'{phase.optim.lr}, steps {begin}-{end}')
      print(freeze.summary(params, labels, state.opt_state))
      if begin < latest:
        state = checkpoint.restore_latest(ckpt, state)
        print(f'Resumed from {ckpt.directory}/{int(state.step)}')
      # A head-only phase on fixed inputs trains on features computed once (feature_cache.py);
      # the state keeps the full params, so checkpoints and resume are as without the cache.
      cache = feature_cache.plan(config, phase, module, state.params, state.model_state, labels,
                                 data, workdir=workdir, mesh=mesh)
      step_module, step_data = (cache.module, cache.data) if cache else (module, data)
      p_step_eval = p_eval_step if cache is None else jax.jit(
          lambda s, b: eval_step(parallel.gather_params(s, mesh), b, module=step_module),
          out_shardings=repl)

      p_train_step = jax.jit(
          lambda s, b: train_step(parallel.gather_params(s, mesh), b, module=step_module, tx=tx,
                                  labels=labels, frozen_bns=frozen_bns, accum_steps=accum_steps),
          in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, repl),
          donate_argnums=0)
      step = int(state.step)
      bar.restart_rate()  # The first step of a segment compiles; the ETA leaves it out.
      compiled = False
      while step < end:
        epoch, skip = divmod(step, steps_per_epoch)  # Epochs count on across phases.
        sums, n, t_epoch, pending, skipped_before_epoch = {}, 0, time.time(), None, skipped
        for batch in data_lib.batches(step_data.train, config.batch_size, seed=config.seed,
                                      epoch=epoch, shuffle=True, drop_remainder=True, start=skip):
          batch = _prepare(step_data, batch, train=True, seed=config.seed, epoch=epoch, step=step)
          state, step_metrics = p_train_step(state, parallel.shard_batch(batch, mesh))
          if not compiled:
            release_freed_host_memory()
            compiled = True
          if pending is not None:
            check_finite(*pending)
          step += 1
          n += 1
          finite = step_metrics.pop('finite')
          pending = (step, finite, step_metrics['loss'])
          step_metrics = {k: jnp.where(finite, v, 0.0) for k, v in step_metrics.items()}
          sums = jax.tree_util.tree_map(jnp.add, sums, step_metrics) if sums else step_metrics
          if step % config.log_every_steps == 0 or step == end:
            check_finite(*pending)
            pending = None
            logged = jax.device_get(step_metrics)
            writer.write(step, split='train', lr=schedule(step - 1 - phase_begin), **logged)
            bar.set_postfix(loss=f'{logged["loss"]:.4f}',
                            ex_s=f'{n * config.batch_size / (time.time() - t_epoch):.1f}')
          bar.update(1)
          stopping = stop.agreed(step, config.log_every_steps)
          if step % config.checkpoint_every_steps == 0 or stopping:
            if pending is not None:  # Never save past an unchecked step.
              check_finite(*pending)
              pending = None
            checkpoint.save(ckpt, state)
          if stopping:
            bar.close()
            print(f'Stopped by {stop.received} after step {step}: checkpoint '
                  f'{ckpt.directory}/{step} saved; run the same command to resume')
            return {'step': step, 'stopped_by': stop.received}
          if step == end:  # A segment may end inside an epoch (gradual unfreezing by steps).
            break
        if pending is not None:
          check_finite(*pending)
        if step % steps_per_epoch:
          continue  # Evaluate at epoch ends only.
        epoch_skipped = skipped - skipped_before_epoch
        train_means = {k: float(v) / max(n - epoch_skipped, 1)
                       for k, v in jax.device_get(sums).items()}
        test = evaluate(p_step_eval, state, step_data, config.batch_size, mesh)
        writer.write(step, split='test', epoch=epoch + 1, **test)
        result = {'epoch': epoch + 1, 'step': step,
                  'train_loss': train_means.get('loss', float('nan')),
                  'train_acc': train_means.get('accuracy', float('nan')),
                  'test_loss': test['loss'], 'test_acc': test['accuracy']}
        if len(phases) > 1:
          result['phase'] = index + 1
        table.row(**result, **{'ex/s': f'{n * config.batch_size / (time.time() - t_epoch):.1f}',
                               'time': f'{time.time() - t_start:.0f}s'})
      checkpoint.save(ckpt, state)  # A segment ends on a checkpoint; the next resumes from it.
      params, model_state = state.params, state.model_state
  if not result:  # Resumed a finished run: evaluate what is there.
    test = evaluate(p_eval_step, state, data, config.batch_size, mesh)
    result = {'step': step, 'test_loss': test['loss'], 'test_acc': test['accuracy']}
  if parallel.is_primary():  # curves.png and confusion_matrix.png (of the final evaluation).
    plots.save_run_plots(workdir, test['confusion_matrix'], data.class_names)
  result['wall_time_s'] = round(time.time() - t_start, 1)
  if skipped:
    result['skipped_steps'] = skipped
  print(f'Done: test accuracy {result["test_acc"]:.4f} after {step} steps '
        + (f'({skipped} skipped as non-finite) ' if skipped else '')
        + f'({result["wall_time_s"]:.0f} s); workdir {workdir}')
  return result
