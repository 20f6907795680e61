"""GRPO (or RLOO) on any task, from any policy: G samples per prompt, group-relative advantages
from the task's reward, no value model:

  python -m align --config=configs/align/grpo.py --config.task.name=jsonl --config.task.path=FILE.jsonl \
      --config.init_from=RUN_OR_HF_DIR --workdir=runs/grpo_mine

One trainer step per rollout of prompts x group samples (batch 512 in 4 micro-batches): each step
exactly on-policy, fewer and larger steps (a small model's policy gradient needs thousands of
samples to be signal: benchmarks/gradient_noise.py). Variants: `:steps=N`, `:lr=X`, `:prompts=P`,
`:group=G`, `:batch=B`, `:accum=A`, `:reward=NAME` (a task's verifier, or 'model'),
`:advantage=grpo|rloo`, `:kl=C`, `:aggregation=sequence_mean|token_mean|fixed_length`, `:clip_high=E`,
`:dynamic=1` (DAPO's dynamic sampling: every group trained on has rewards that differ, found over
rounds of `:sampling_prompts=N` prompts, default `prompts`).
"""

from configs import common
from configs.align.experiments import online_config

DEFAULTS = dict(steps=24, lr=1e-4, prompts=64, group=8, batch=512, accum=4, reward="exact", advantage="grpo", kl=0.0,
                aggregation="sequence_mean", clip_high=0.2, dynamic=0, sampling_prompts=0)


def build(arg):
  config = online_config("grpo", arg)
  config.batch_size = arg.batch
  config.grad_accum_steps = arg.accum
  config.rl.samples_per_prompt = arg.group
  config.grpo.advantage = arg.advantage
  config.grpo.kl_coef = arg.kl
  config.grpo.aggregation = arg.aggregation
  config.grpo.clip_high = arg.clip_high
  config.grpo.dynamic_sampling = bool(arg.dynamic)
  config.grpo.sampling_prompts = arg.sampling_prompts
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
