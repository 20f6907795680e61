"""TPO (Thought Preference Optimization) on any task, from any policy: the policy thinks, then
responds after "Here is my response:" (the paper's generic thought prompt, config.tpo.template); the
judge (config.rl.reward: a task's verifier or 'model', a reward-model run) scores the response alone;
each prompt's best and worst of `samples` become a DPO pair; each iteration samples anew from the
policy being trained, whose pairs' reference is that iteration's starting policy:

  python -m align --config=configs/align/tpo.py --config.task.name=jsonl \
      --config.task.path=FILE.jsonl --config.init_from=RUN_OR_HF_DIR --workdir=runs/tpo_mine

Variants: `:steps=N`, `:lr=X`, `:prompts=P` (prompts per iteration), `:samples=K`, `:epochs=E`
(passes over each iteration's pairs), `:beta=B`, `:reward=NAME` (or `model` with
--config.rl.reward_model=RM_RUN). The template and marker: --config.tpo.template, --config.tpo.marker.
"""

from configs import common
from configs.align.experiments import online_config

DEFAULTS = dict(steps=96, lr=1e-5, prompts=64, samples=4, epochs=2, beta=0.1, reward="exact")


def build(arg):
  config = online_config("tpo", arg)
  config.rl.samples_per_prompt = arg.samples
  config.rl.epochs = arg.epochs
  config.tpo.beta = arg.beta
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
