"""Orbax checkpoints of a run: train state, data-iterator state and resolved config, per step.

Saves are asynchronous (the step loop goes on while arrays are written) and atomic: orbax writes
each step under a temporary name and renames it when complete, so a crash mid-save leaves the
previous checkpoint as the latest. The last `keep` checkpoints are kept.
"""

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """`workdir/checkpoints/<step>/{state, data, config}`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int, async_save: bool = True, read_only: bool = False):
    """read_only: for readers of another run (init_from, inference), which must never delete the
    temporary directory of a save that run has in flight."""
    self.directory = Path(directory).absolute()
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
      )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, config: dict) -> None:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(config),
    )
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """State placed as `abstract_state` (ShapeDtypeStructs with shardings) says, and the data state."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
      )
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"the checkpoint {self.directory / str(step)} does not fit this run's state; was the model or "
          f"optimizer config changed since it was written? ({type(e).__name__}: {str(e)[:300]})"
      ) from e
    return restored["state"], restored["data"]

  def restore_params(self, step: int, abstract_params: Any, prefix: str = "") -> Any:
    """Only the parameters of a checkpoint (placed as `abstract_params` says): the optimizer of
    the run that wrote it may differ from the one that now fine-tunes them. `prefix`: read the
    subtree params[prefix] (the decoder inside a method's wrapper, say) into `abstract_params`."""
    target = {"params": {prefix: abstract_params} if prefix else abstract_params}
    # restore_args carry the target shardings; without them orbax places arrays as they were saved,
    # which fails when the reading process has other devices than the writing one.
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    restored = self._manager.restore(step, args=ocp.args.Composite(state=restore))
    params = restored["state"]["params"]
    return params[prefix] if prefix else params

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_data(self, step: int) -> dict:
    """The data state alone (the iterator's position and what the trainer keeps beside it)."""
    return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any) -> Any:
  """ShapeDtypeStructs carrying each array's sharding: the target of a sharded restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
