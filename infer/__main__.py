"""python -m infer --config=configs/infer/generate.py --config.checkpoint=DIR --config.prompt="..."

Only parses flags; the work is in infer.cli.run, importable from a notebook. A bad config, key or
path is reported in one line with exit status 2; --verbosity=1 shows its traceback (configs/cli.py).
"""

from infer import cli

if __name__ == "__main__":
  cli.main(cli.run, config_help="Generation config file (configs/infer/...py[:arg]).",
           workdir_help="Unused by generation.")
