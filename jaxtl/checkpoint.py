"""Orbax checkpoints of the train state in <workdir>/checkpoints; the newest one is resumed."""
import pathlib

import jax
import orbax.checkpoint as ocp

from jaxtl.errors import JaxtlError


def manager(workdir, max_to_keep=2) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))


def save(mngr, state):
  step = int(jax.device_get(state.step))
  if mngr.latest_step() != step:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def restore_latest(mngr, state):
  """The newest checkpoint restored into the structure and shardings of `state`, or `state`."""
  step = mngr.latest_step()
  if step is None:
    return state
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise JaxtlError(f'{mngr.directory}/{step}: the checkpoint does not match this config\'s model '
                     f'and freeze scheme; use a new --workdir ({type(e).__name__}: '
                     f'{str(e)[:300]})') from None


def restore_raw(workdir):
  """(step, state as nested dicts) of the newest checkpoint in <workdir>/checkpoints, read without
  a target structure: for predict, evaluate and export, which need params, not optimizer state."""
  directory = pathlib.Path(workdir).absolute() / 'checkpoints'
  mngr = ocp.CheckpointManager(directory) if directory.is_dir() else None
  step = mngr.latest_step() if mngr else None
  if step is None:
    raise JaxtlError(f'{directory}: no checkpoint to read')
  try:
    return step, mngr.restore(step, args=ocp.args.StandardRestore())
  except Exception as e:  # Orbax raises many types for a damaged checkpoint.
    raise JaxtlError(f'{directory}/{step}: unreadable checkpoint ({type(e).__name__}: '
                     f'{str(e)[:300]})') from None
