"""python -m infer --config=configs/infer/generate.py --config.checkpoint=DIR --config.prompt="..."

Only parses flags; the work is in infer.cli.run, importable from a notebook. A bad config, key or
path is reported in one line with exit status 2; --verbosity=1 shows its traceback (configs/cli.py).
"""

from absl import app, flags
from ml_collections import config_flags

from configs import cli as configs_cli
from infer import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Generation config file (configs/infer/...py[:arg]).")
# Accepted so every entry point takes the same flags; generation writes nothing but stdout.
flags.DEFINE_string("workdir", None, "Unused by generation.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run(_CONFIG.value)


if __name__ == "__main__":
  configs_cli.run(main)
