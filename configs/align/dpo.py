"""The DPO family on any task's preference pairs (the task's right versus wrong completions, or,
with `:pairs=ai_feedback`, the starting policy's own samples judged by the task's exact reward):

  python -m align --config=configs/align/dpo.py:pairs=ai_feedback --config.task.name=jsonl \
      --config.task.path=FILE.jsonl --config.init_from=RUN_OR_HF_DIR --workdir=runs/dpo_mine

Variants: `:steps=N`, `:loss=sigmoid|robust|ipo|hinge|simpo|orpo`, `:beta=B`, `:sft=A` (RPO: + A *
NLL of chosen), `:lr=X`, `:pairs=data|ai_feedback`. The reference log-probs are the starting
model's, computed once into the workdir.
"""

from configs import common
from configs.align.experiments import offline_config

DEFAULTS = dict(steps=150, loss="sigmoid", beta=0.1, pairs="data", sft=0.0, lr=1e-5)


def build(arg):
  config = offline_config("dpo", arg, warmup_steps=10)
  config.task.train_size = 2000 if arg.pairs == "data" else 400  # prompts to sample for AI feedback
  config.task.measure_kl = True  # KL(policy || the policy it started from)
  config.dpo.loss_type = arg.loss
  config.dpo.beta = arg.beta
  config.dpo.pairs = arg.pairs
  config.dpo.sft_coef = arg.sft
  config.dpo.ai_feedback_samples = 8
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
