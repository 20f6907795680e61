"""The XLA flags of the test suite, for its own process (tests/conftest.py) and the processes its
tests start (`python -m align`, the multi-host workers, a SIGTERM'd trainer).

Compilation dominates the suite's time: XLA's quickest CPU code generation (LLVM at -O0, its
expensive passes off) compiles the suite's many small programs about a third faster; their tiny
models run about as fast. HLO optimizations, and so every test's numerics, are unchanged.
"""

import os

QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int | None) -> str:
  """XLA_FLAGS with the quick-compile flags and `devices` fake CPU devices (None: one)."""
  count = () if devices is None else (f"--xla_force_host_platform_device_count={devices}",)
  return " ".join((*count, *QUICK_COMPILE_FLAGS))


def subprocess_env(devices: int | None, **extra: str) -> dict[str, str]:
  """This process's environment for a child jax process on `devices` fake CPU devices."""
  return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", **extra}
