"""Training: a TrainState pytree, one jitted train step over a device mesh, an eval step, and the
loop `train_and_evaluate(config, workdir)` that ties data, model, freezing and checkpoints."""
import json
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtl import checkpoint, data as data_lib, freeze, metrics, models, parallel, weights
from jaxtl.data import text as text_data
from jaxtl.errors import ConfigError, JaxtlError


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any            # All params, trainable and frozen.
  model_state: Any       # Other variable collections (e.g. batch_stats); {} for BERT.
  opt_state: Any         # State for the trainable subtree only.
  rng: jax.Array


# ---------------------------------------------------------------------------------------------
# Model and optimizer.
# ---------------------------------------------------------------------------------------------
def create_model(config, num_classes):
  """(module, variables) from config.model: a pretrained `source`, or a registry `name`."""
  mc = config.model
  overrides = dict(mc.get('overrides') or {})
  if mc.get('source'):
    return weights.load_pretrained(mc.source, num_classes=num_classes,
                                   dont_load=tuple(mc.get('dont_load') or ()), overrides=overrides)
  if not mc.get('name'):
    raise ConfigError('config.model needs `source` (pretrained weights) or `name` (a registry '
                      f'model: {", ".join(sorted(models.REGISTRY))})')
  module = models.create(mc.name, num_classes=num_classes, **overrides)
  variables = module.init(jax.random.key(config.seed), *module.example_inputs())
  return module, flax.core.unfreeze(variables)


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
  lr_mult = dict(optim.get('lr_mult') or {})
  groups = set(jax.tree_util.tree_leaves(freeze.trainable_labels(labels)))
  unknown = sorted(set(lr_mult) - groups)
  if unknown:
    raise ConfigError(f'config.optim.lr_mult names group(s) {unknown} that the freeze scheme does '
                      f'not produce; trainable groups: {sorted(groups)}')

  def make_tx(group):
    # A group's multiplier scales its whole schedule (warmup and decay alike).
    mult = lr_mult.get(group, 1.0)
    lr = schedule if mult == 1.0 else (lambda step: mult * schedule(step))
    if name == 'adamw':
      return optax.adamw(lr, b1=optim.get('b1', 0.9), b2=optim.get('b2', 0.999),
                         eps=optim.get('eps', 1e-8), weight_decay=optim.get('weight_decay', 0.0),
                         mask=_decay_mask)
    if name == 'sgd':
      return optax.chain(optax.add_decayed_weights(optim.get('weight_decay', 0.0), _decay_mask),
                         optax.sgd(lr, momentum=optim.get('momentum', 0.9) or None,
                                   nesterov=optim.get('nesterov', False)))
    raise ConfigError(f'config.optim.name {name!r} is not one of adamw, sgd')

  tx = freeze.partition(make_tx, labels)
  if optim.get('clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
  return tx, schedule


# ---------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------
def _model_inputs(batch):
  return {k: v for k, v in batch.items() if k not in ('label', 'mask')}


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state, batch, *, module, tx, labels):
  """One update. Only the trainable subtree is differentiated: frozen params enter the loss as
  constants, so no backward pass runs through a frozen prefix."""
  trainable, frozen = freeze.split(state.params, labels)
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  mutable = list(state.model_state)

  def loss_fn(trainable):
    variables = {'params': freeze.merge(trainable, frozen), **state.model_state}
    (logits, _), new_model_state = module.apply(
        variables, **_model_inputs(batch), train=True, rngs={'dropout': dropout_rng},
        mutable=mutable)
    return cross_entropy(logits, batch['label']).mean(), (logits, new_model_state)

  (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  new_state = state.replace(step=state.step + 1, params=freeze.merge(trainable, frozen),
                            model_state=model_state, opt_state=opt_state)
  return new_state, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
                     'grad_norm': optax.global_norm(grads)}


def eval_step(state, batch, *, module):
  """Sums over the real (mask = 1) examples of a padded batch."""
  variables = {'params': state.params, **state.model_state}
  logits, _ = module.apply(variables, **_model_inputs(batch), train=False)
  mask = batch['mask']
  return {'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
          'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
          'count': jnp.sum(mask)}


def evaluate(p_eval_step, state, arrays, batch_size, mesh):
  totals = None
  for batch in data_lib.batches(arrays, batch_size):
    out = p_eval_step(state, parallel.shard_batch(batch, mesh))
    totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {'loss': float(totals['loss'] / totals['count']),
          'accuracy': float(totals['correct'] / totals['count'])}


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def load_data(config):
  if config.data.kind != 'synthetic' and not config.model.get('source'):
    if not config.data.get('tokenizer'):
      raise ConfigError('config.data.tokenizer is needed when config.model has no pretrained source')
  tokenizer_dir = config.data.get('tokenizer') or (
      weights.resolve(config.model.source) if config.data.kind != 'synthetic' else None)
  if tokenizer_dir is not None and tokenizer_dir.is_file():
    tokenizer_dir = tokenizer_dir.parent
  return text_data.load(config.data, tokenizer_dir, seed=config.seed)


def _prepare_workdir(workdir):
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / '.write_test'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'--workdir {workdir}: not writable ({e.strerror})') from None
  return workdir


def train_and_evaluate(config, workdir) -> dict:
  """Trains per `config`, evaluating on the test split each epoch; returns the final metrics."""
  t_start = time.time()
  data = load_data(config)
  workdir = _prepare_workdir(workdir)
  num_classes = len(data.class_names)
  module, variables = create_model(config, num_classes)
  params = variables.pop('params')
  labels = freeze.label_params(params, config.freeze.scheme, module)

  mesh = parallel.make_mesh(config.get('mesh', {}).get('data'))
  parallel.check_batch_size(config.batch_size, mesh)
  n_train = data_lib.num_examples(data.train)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f'config.batch_size = {config.batch_size} is larger than the '
                      f'{n_train} training examples')
  total_steps = config.num_epochs * steps_per_epoch
  tx, schedule = make_optimizer(config.optim, labels, total_steps)
  trainable, _ = freeze.split(params, labels)

  repl = parallel.replicated(mesh)
  state = jax.device_put(TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
      opt_state=tx.init(trainable), rng=jax.random.PRNGKey(config.seed)), repl)
  print(freeze.summary(params, labels, state.opt_state))

  ckpt = checkpoint.manager(workdir)
  state = checkpoint.restore_latest(ckpt, state)
  start_step = int(state.step)
  if start_step:
    print(f'Resumed from {ckpt.directory}/{start_step}')
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  (workdir / 'classes.json').write_text(json.dumps(data.class_names))

  batch_sharding = parallel.data_sharded(mesh)
  p_train_step = jax.jit(
      lambda s, b: train_step(s, b, module=module, tx=tx, labels=labels),
      in_shardings=(repl, batch_sharding), out_shardings=(repl, repl), donate_argnums=0)
  p_eval_step = jax.jit(lambda s, b: eval_step(s, b, module=module),
                        in_shardings=(repl, batch_sharding), out_shardings=repl)

  writer, table = metrics.JsonlWriter(workdir), metrics.EpochTable()
  bar = metrics.progress(total_steps, start_step, 'train')
  step, result = start_step, {}
  while step < total_steps:
    epoch, skip = divmod(step, steps_per_epoch)
    sums, n, t_epoch = {}, 0, time.time()
    for batch in data_lib.batches(data.train, config.batch_size, seed=config.seed, epoch=epoch,
                                  shuffle=True, drop_remainder=True, start=skip):
      state, step_metrics = p_train_step(state, parallel.shard_batch(batch, mesh))
      step += 1
      n += 1
      sums = jax.tree_util.tree_map(jnp.add, sums, step_metrics) if sums else step_metrics
      if step % config.log_every_steps == 0 or step == total_steps:
        logged = jax.device_get(step_metrics)
        if not np.isfinite(logged['loss']):
          raise JaxtlError(f'step {step}: the loss is {logged["loss"]} (non-finite); lower '
                           'config.optim.lr or check the data')
        writer.write(step, split='train', lr=schedule(step - 1), **logged)
        bar.set_postfix(loss=f'{logged["loss"]:.4f}',
                        ex_s=f'{n * config.batch_size / (time.time() - t_epoch):.1f}')
      bar.update(1)
      if step % config.checkpoint_every_steps == 0:
        checkpoint.save(ckpt, state)
    train_means = {k: float(v) / max(n, 1) for k, v in jax.device_get(sums).items()}
    test = evaluate(p_eval_step, state, data.test, config.batch_size, mesh)
    writer.write(step, split='test', epoch=epoch + 1, **test)
    result = {'epoch': epoch + 1, 'step': step, 'train_loss': train_means.get('loss', float('nan')),
              'train_acc': train_means.get('accuracy', float('nan')), 'test_loss': test['loss'],
              'test_acc': test['accuracy']}
    table.row(**result, **{'ex/s': round(n * config.batch_size / (time.time() - t_epoch), 1),
                           'time': f'{time.time() - t_start:.0f}s'})
  bar.close()
  checkpoint.save(ckpt, state)
  if not result:  # Resumed a finished run: evaluate what is there.
    test = evaluate(p_eval_step, state, data.test, config.batch_size, mesh)
    result = {'step': step, 'test_loss': test['loss'], 'test_acc': test['accuracy']}
  result['wall_time_s'] = round(time.time() - t_start, 1)
  print(f'Done: test accuracy {result["test_acc"]:.4f} after {step} steps '
        f'({result["wall_time_s"]:.0f} s); workdir {workdir}')
  return result
