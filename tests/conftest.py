"""Test set-up: 8 fake CPU devices, configured before jax is first imported.

pytest imports this file before any test module, so the flag is in place when jax starts.
A GPU or TPU run of the hardware-only tests sets JAX_PLATFORMS itself.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
