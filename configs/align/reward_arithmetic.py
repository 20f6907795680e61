"""A reward model on the arithmetic task's preference pairs (right versus wrong worked solutions), from SFT:

  python -m align --config=configs/align/sft_arithmetic.py --workdir=runs/sft
  python -m align --config=configs/align/reward_arithmetic.py --workdir=runs/rm

Variants: `:steps=N`, `:init=DIR`, `:difficulty=D`, `:lr=X`. The decoder plus a scalar head read at
the last token, Bradley-Terry loss (align/reward_model.py); the held-out pairs' loss and accuracy
(chosen above rejected) a third of the way. It ranks samples for best-of-N (align/compute_curves.py,
`--config.reward_model=runs/rm`) and is PPO's reward with `rl.reward=model`. The wrong solutions are
the task's (a dropped carry, an off-by-one answer), not the policy's own mistakes.
"""

from configs import common
from configs.align.experiments import offline_config, on_arithmetic

DEFAULTS = dict(steps=150, lr=3e-4, init="runs/sft", difficulty=2)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  config = offline_config("reward", arg, warmup_steps=10)
  config.task.train_size = 2000
  return on_arithmetic(config, arg)
