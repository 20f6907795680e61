"""Test set-up: 8 fake CPU devices, configured before jax is first imported.

pytest imports this file before any test module, so the flag is in place when jax starts.
A GPU or TPU run of the hardware-only tests sets JAX_PLATFORMS itself.
"""

import os
import tempfile

from tests import xla_env

# 8 fake devices and XLA's quickest CPU compilation (tests/xla_env.py), unless the caller chose flags.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_env.xla_flags(8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build the same programs many times (every trainer setup and generate call jits anew, and
# the multi-host and SIGTERM tests start processes); a persistent cache shared by the session and
# its subprocesses compiles each distinct program once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ingredients-jax-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# libtpu (the test extra) compiles Pallas kernels and train steps for TPU slices on this CPU: without
# its lockfile, so each xdist worker may load it, and quietly (train/aot/topology.py).
from train.aot import topology as _tpu_topology  # noqa: E402 (imports no jax)

_tpu_topology.quiet_libtpu()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


def pytest_collection_modifyitems(config, items):
  del config
  platform = jax.default_backend()
  for item in items:
    for marker in ("gpu", "tpu"):
      if marker in item.keywords and platform != marker:
        item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()}; the backend here is {platform}"))
