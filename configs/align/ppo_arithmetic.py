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
from configs.align.rl_common import online_config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=200, init="runs/sft", lr=3e-5, difficulty=2, prompts=64, kl=0.05, value="head",
                         adaptive=False)
  config = online_config("ppo", arg)
  config.rl.epochs = 2
  config.rl.missing_eos_penalty = 1.0
  config.ppo.kl_coef = arg.kl
  config.ppo.value = arg.value
  config.ppo.adaptive_kl = arg.adaptive
  config.ppo.target_kl = 1.0
  config.ppo.kl_horizon = 2000
  config.ppo.vf_coef = 0.1
  return config
