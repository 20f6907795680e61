"""python -m align --config=configs/align/FILE.py[:ARG] --config.KEY=VALUE --workdir=DIR

Only parses flags; the work is in align.run, importable from a notebook. A bad config, key or
path is reported in one line with exit status 2; --verbosity=1 shows its traceback (configs/cli.py).
"""

import logging

from train.host_devices import one_device_per_cpu_core

one_device_per_cpu_core()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from align import run as run_lib  # noqa: E402
from configs import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/align/...py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  run_lib.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
