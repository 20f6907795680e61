"""python -m train --config=configs/pretrain/FILE.py[:ARG] --config.KEY=VALUE --workdir=DIR

Only parses flags; the work is in train.trainer, importable from a notebook.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from train import trainer

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
