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
