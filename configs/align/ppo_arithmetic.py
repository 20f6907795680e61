"""PPO RLHF on the arithmetic task from part 1's SFT checkpoint (the task's process reward 'solution', value head,
k1 KL penalty in the reward, GAE, 2 epochs of minibatches per rollout batch):

  python -m align --config=configs/align/ppo_arithmetic.py --workdir=runs/ppo

At these defaults PPO ends below its start (0.205 -> 0.145 held-out accuracy), as far as the same
run with its rewards shuffled (`--config.rl.shuffle_rewards=True`: 0.165): minibatches of 16
single samples are far below what the policy gradient needs to be signal (GRPO's noise scale at
this checkpoint is 5,000-20,000 samples, `benchmarks/gradient_noise.py`), so the updates are
mostly noise (README, alignment results).

Variants: `:steps=N`, `:init=DIR`, `:lr=X`, `:kl=C` (the KL coefficient), `:value=head|model`,
`:adaptive=True` (Ziegler et al.'s controller toward ppo.target_kl), `:prompts=P` (rollout batch).
"""

from configs import common
from configs.align import ppo
from configs.align.experiments import on_arithmetic

DEFAULTS = {**ppo.DEFAULTS, "reward": "solution", "init": "runs/sft", "difficulty": 2}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  return on_arithmetic(ppo.build(arg), arg)
