"""GRPO (or RLOO) on the arithmetic task from part 1's SFT checkpoint: 8 samples per prompt,
group-relative advantages from the task's process reward 'solution', no value model:

  python -m align --config=configs/align/grpo_arithmetic.py --workdir=runs/grpo
  python -m align --config=configs/align/grpo_arithmetic.py:advantage=rloo --workdir=runs/rloo

Variants: `:steps=N`, `:init=DIR`, `:lr=X`, `:group=G`, `:kl=C` (k3 KL to the reference in the
loss), `:aggregation=sequence_mean|token_mean|fixed_length`, `:clip_high=E` (DAPO's clip-higher).
"""

from configs import common
from configs.align.rl_common import online_config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=200, init="runs/sft", lr=3e-5, difficulty=2, prompts=16, group=8,
                         advantage="grpo", kl=0.0, aggregation="sequence_mean", clip_high=0.2)
  config = online_config("grpo", arg)
  config.rl.samples_per_prompt = arg.group
  config.grpo.advantage = arg.advantage
  config.grpo.kl_coef = arg.kl
  config.grpo.aggregation = arg.aggregation
  config.grpo.clip_high = arg.clip_high
  return config
