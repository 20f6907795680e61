"""python -m train --config=configs/pretrain/FILE.py[:ARG] --config.KEY=VALUE --workdir=DIR

Only parses flags; the work is in train.trainer, importable from a notebook.
"""

import logging
import os


def _one_device_per_cpu_core() -> None:
  """On a CPU, XLA runs one device's program on about one core; several host devices let the
  default data-parallel mesh use them all (the losses are the same: see tests/test_train.py).
  Must run before jax starts its backends; an explicit device count in XLA_FLAGS is kept."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags_now:
    return
  cores = os.cpu_count() or 1
  devices = 1 << min(cores.bit_length() - 1, 3)  # a power of two (it divides the usual batch sizes), at most 8
  os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={devices}".strip()


_one_device_per_cpu_core()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/...py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
