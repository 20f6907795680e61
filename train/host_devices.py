"""Entry points call `one_device_per_cpu_core()` before jax starts (it must not import jax)."""

import os


def one_device_per_cpu_core() -> None:
  """On a CPU, XLA runs one device's program on about one core; several host devices let the
  default data-parallel mesh use them all (the losses are the same: see tests/test_train.py).
  Must run before jax starts its backends; an explicit device count in XLA_FLAGS is kept."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags_now:
    return
  cores = os.cpu_count() or 1
  devices = 1 << min(cores.bit_length() - 1, 3)  # a power of two (it divides the usual batch sizes), at most 8
  os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={devices}".strip()
