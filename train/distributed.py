"""Multi-host start-up: `jax.distributed.initialize` from the config or the usual environment.

`config.distributed` keys: coordinator_address ('' = not distributed, unless JAX_COORDINATOR_ADDRESS
is set or a cluster (TPU pod, SLURM) is detected with auto=True), num_processes, process_id
(-1 = from JAX_NUM_PROCESSES / JAX_PROCESS_ID or cluster detection), auto (bool: call
initialize() with no arguments and let jax detect the cluster).
"""

import os

import jax
import ml_collections


def initialize(config: ml_collections.ConfigDict) -> None:
  """Joins the processes of a multi-host run; a no-op for a single process."""
  address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address and not config.auto:
    return
  if jax.distributed.is_initialized():
    return
  num_processes = config.num_processes if config.num_processes >= 0 else os.environ.get("JAX_NUM_PROCESSES")
  process_id = config.process_id if config.process_id >= 0 else os.environ.get("JAX_PROCESS_ID")
  if address and (num_processes is None or process_id is None):
    raise ValueError(
        f"config.distributed.coordinator_address={address!r} needs num_processes and process_id "
        "(config.distributed.* or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
    )
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU devices of several processes talk through gloo (no-op where a GPU/TPU backend is used).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if address:
    jax.distributed.initialize(address, int(num_processes), int(process_id))
  else:
    jax.distributed.initialize()
