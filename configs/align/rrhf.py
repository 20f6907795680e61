"""RRHF on any task: each prompt's responses (the starting policy's samples, with the task's worked
solution among them) ranked by the task's reward, a hinge on their length-normalised log-probs plus
SFT on the best:

  python -m align --config=configs/align/rrhf.py --config.task.name=jsonl --config.eval_every=0 \
      --config.task.path=FILE.jsonl --config.init_from=RUN_OR_HF_DIR --workdir=runs/rrhf_mine

(the held-out loss ranks the task's right versus wrong completions, which a JSONL task has not: hence
eval_every=0), or on ranked responses from any sources, {"prompt", "responses": [...], "scores": [...]}
per line:

  python -m align --config=configs/align/rrhf.py:source=data --config.task.name='' \
      --config.rrhf.train_path=FILE.jsonl --config.rrhf.eval_path=HELD_OUT.jsonl \
      --config.rrhf.responses=MOST_RESPONSES_A_RECORD_HAS --config.init_from=DIR --workdir=runs/rrhf_data

Variants: `:steps=N`, `:lr=X`, `:source=policy|data` (data with a task: its right and wrong
completions), `:samples=N` (the policy's samples per prompt), `:solutions=True|False` (the task's
worked solution as one more response), `:sft=W` (the SFT loss's weight, 1 in the paper), `:reward=NAME`.
The policy's responses are sampled once, into the workdir. The learning rate is the DPO configs'
(not tuned for RRHF).
"""

from configs import common
from configs.align.experiments import offline_config

DEFAULTS = dict(steps=150, lr=1e-5, source="policy", samples=4, solutions=True, sft=1.0, reward="exact")


def build(arg):
  config = offline_config("rrhf", arg, warmup_steps=10)
  config.task.train_size = 400  # prompts to sample for (source=policy) or the task's ranked pairs
  config.task.measure_kl = True  # KL(policy || the policy it started from)
  config.rrhf.source = arg.source
  config.rrhf.samples = arg.samples
  config.rrhf.with_solutions = arg.solutions
  config.rrhf.responses = arg.samples + int(arg.solutions) if arg.source == "policy" else 2
  config.rrhf.sft_weight = arg.sft
  config.rrhf.reward = arg.reward
  return config


def get_config(arg: str | None = None):
  return build(common.parse_arg(arg, **DEFAULTS))
