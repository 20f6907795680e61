"""SFT on the synthetic arithmetic task, from the pre-training quickstart's checkpoint:

  python -m train --config=configs/pretrain/quickstart.py --workdir=runs/quickstart
  python -m align --config=configs/align/sft_arithmetic.py --workdir=runs/sft

Variants: `:steps=N`, `:init=DIR` (another run or a Hugging Face directory), `:difficulty=D`, `:lr=X`.
Reports exact-match accuracy of greedy answers on held-out problems before and after.
"""

from configs import common
from configs.align.common import align_config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=1500, init="runs/quickstart", difficulty=2, lr=3e-3)
  config = align_config("sft")
  config.init_from = arg.init
  config.total_steps = arg.steps
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 25
  config.eval_every = max(arg.steps // 3, 1)
  config.eval_steps = 4
  config.checkpoint_every = 200
  config.task.name = "arithmetic"
  config.task.difficulty = arg.difficulty
  config.task.accuracy_problems = 200  # the same held-out problems in every experiment
  config.model = common.model_config("tiny")  # placeholders only: the architecture comes from init_from
  config.optimizer.learning_rate = arg.lr
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0
  return config
