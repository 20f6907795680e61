"""PPO on any task, from any policy (value head, k1 KL penalty in the reward, GAE, 2 epochs of
minibatches per rollout batch):

  python -m align --config=configs/align/ppo.py --config.task.name=jsonl --config.task.path=FILE.jsonl \
      --config.init_from=RUN_OR_HF_DIR --workdir=runs/ppo_mine

Variants: `:steps=N`, `:lr=X`, `:kl=C` (the KL coefficient), `:value=head|model`, `:adaptive=True`
(Ziegler et al.'s controller toward ppo.target_kl), `:prompts=P` (rollout batch), `:reward=NAME`.
"""

from configs import common
from configs.align.experiments import online_config

DEFAULTS = dict(steps=200, lr=3e-5, prompts=64, kl=0.05, value="head", adaptive=False, reward="exact")


def build(arg):
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


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
