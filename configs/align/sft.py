"""SFT on any task's worked solutions, from any checkpoint:

  python -m align --config=configs/align/sft.py --config.task.name=jsonl --config.task.path=FILE.jsonl \
      --config.init_from=RUN_OR_HF_DIR --workdir=runs/sft_mine

(or `--config.task.name=my_package.my_module:make_task`; with `--config.task.name=''`, the JSONL
examples of `--config.sft.train_path`). Reports the task's held-out scores before and after.
Variants: `:steps=N`, `:lr=X`.
"""

from configs import common
from configs.align.experiments import offline_config

DEFAULTS = dict(steps=1500, lr=3e-3)


def build(arg):
  return offline_config("sft", arg, warmup_steps=20)


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
