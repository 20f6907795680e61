"""SFT on any task's worked solutions, from any checkpoint:

  python -m align --config=configs/align/sft.py --config.task.name=jsonl --config.task.path=FILE.jsonl \
      --config.init_from=RUN_OR_HF_DIR --workdir=runs/sft_mine

(or `--config.task.name=my_package.my_module:make_task`; with `--config.task.name=''`, the JSONL
examples of `--config.sft.train_path`). Reports the task's held-out scores before and after.
Variants: `:steps=N`, `:lr=X`.
"""

from configs import common
from configs.align.common import align_config

DEFAULTS = dict(steps=1500, lr=3e-3)


def build(arg):
  config = align_config("sft")
  config.total_steps = arg.steps
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 25
  config.eval_every = max(arg.steps // 3, 1)
  config.eval_steps = 4
  config.checkpoint_every = 200
  config.task.accuracy_problems = 200  # the same held-out problems in every experiment
  config.model = common.model_config("tiny")  # placeholders only: the architecture comes from init_from
  config.optimizer.learning_rate = arg.lr
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
