"""Orbax checkpoints of the train state in <workdir>/checkpoints; the newest one is resumed."""
import pathlib

import jax
import orbax.checkpoint as ocp

from jaxtl.errors import CheckpointError, JaxtlError


def manager(workdir, max_to_keep=2) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))


def save(mngr, state):
  step = int(jax.device_get(state.step))
  if mngr.latest_step() != step:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def _shapes(tree) -> dict:
  """{'opt_state/1/mu/encoder/...': shape}: one spelling for attribute, key and index paths, so
  that a TrainState and the nested dicts of a checkpoint's metadata compare."""
  def part(key):
    for field in ('name', 'key', 'idx'):
      if hasattr(key, field):
        return str(getattr(key, field))
    return str(key)
  return {'/'.join(part(k) for k in path): tuple(getattr(leaf, 'shape', ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _listed(items, limit=4):
  items = sorted(items, key=lambda item: (not item.startswith('params/'), item))
  return ', '.join(items[:limit]) + (f' and {len(items) - limit} more' if len(items) > limit else '')


def _differences(directory, step, state) -> str:
  """How the checkpoint's arrays differ from `state`'s, by path and shape ('' if they agree, or if
  the metadata cannot be read: the restore then reports what is wrong)."""
  try:
    saved = _shapes(ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
                    .item_metadata(step).tree)
  except Exception:  # pylint: disable=broad-except
    return ''
  wanted = _shapes(state)
  problems = []
  mismatched = [f'{p} is {saved[p]} in the checkpoint but {wanted[p]} here'
                for p in wanted if p in saved and saved[p] != wanted[p]]
  if mismatched:
    problems.append(_listed(mismatched))
  if only_saved := [p for p in saved if p not in wanted]:
    problems.append(f'{len(only_saved)} array(s) only in the checkpoint: {_listed(only_saved)}')
  if only_wanted := [p for p in wanted if p not in saved]:
    problems.append(f'{len(only_wanted)} array(s) missing from it: {_listed(only_wanted)}')
  return '; '.join(problems)


def restore_latest(mngr, state):
  """The newest checkpoint restored into the structure and shardings of `state`, or `state`.

  A checkpoint of another model or freeze scheme (a reused --workdir) is refused before any array
  is read, naming the arrays that differ."""
  step = mngr.latest_step()
  if step is None:
    return state
  advice = ('it was written by another model or freeze scheme than this config\'s; use a new '
            '--workdir, or the config that wrote it')
  if differences := _differences(mngr.directory, step, state):
    raise CheckpointError(f'{mngr.directory}/{step}: {advice} ({differences})')
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'{mngr.directory}/{step}: {advice} ({type(e).__name__}: '
                          f'{str(e)[:300]})') from None


def restore_raw(workdir):
  """(step, state as nested dicts) of the newest checkpoint in <workdir>/checkpoints, read without
  a target structure: for predict, evaluate and export, which need params, not optimizer state."""
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  mngr = (ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
          if directory.is_dir() else None)
  step = mngr.latest_step() if mngr else None
  if step is None:
    raise JaxtlError(f'{directory}: no checkpoint to read')
  try:
    # The saved shardings name the training run's devices, which this process may lack.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        mngr.item_metadata(step).tree)
    return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # Orbax raises many types for a damaged checkpoint.
    raise JaxtlError(f'{directory}/{step}: unreadable checkpoint ({type(e).__name__}: '
                     f'{str(e)[:300]})') from None
