"""Test-time compute against train-time compute on a task (align/compute_curves.py):

  python -m align.compute_curves --config=configs/align/compute_curves.py:difficulty=1 --config.policy=runs/sft_d1 \
      [--config.reward_model=runs/rm_d1] [--config.sft_runs=runs/sft_a,runs/sft_b] --out=runs/curves_d1

Held-out accuracy against inference FLOPs per problem for best-of-N with the task's verifier (an
oracle: pass@N), best-of-N with a reward model, self-consistency, and budget forcing's thinking
budget; greedy accuracy against training FLOPs for every checkpoint of `sft_runs` (default: the
policy's own run) and its starting point. Writes DIR/curves.png and DIR/curves.json.
Variants: `:difficulty=D`, `:problems=P`, `:samples=M` (N runs over the powers of two up to M).
`:problems=8,samples=4` runs on a laptop in a minute or two.
"""

import ml_collections

from configs import common
from configs.align.common import task_config

DEFAULTS = dict(difficulty=2, problems=200, samples=64)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  config = ml_collections.ConfigDict()
  config.policy = ""  # required: the run (or Hugging Face directory) whose samples are scored
  config.step = -1  # the policy run's checkpoint step; -1: the latest
  config.reward_model = ""  # a reward-model run (method=reward): best-of-N by its scores ('': that curve is skipped)
  config.sft_runs = ""  # comma-separated runs for the train-time curve ('': the policy's own run)
  config.sft_init = True  # the train-time curve starts at the runs' init_from (0 SFT FLOPs)
  config.task = task_config()
  config.task.name = "arithmetic"
  config.task.difficulty = arg.difficulty
  config.problems = arg.problems  # held-out problems, the same for every curve
  config.ns = tuple(2**i for i in range(arg.samples.bit_length()) if 2**i <= arg.samples)  # samples per problem
  config.temperature = 1.0  # of the N samples
  config.max_new_tokens = 64  # per sample (and per greedy answer of the train-time curve)
  config.seed = 1  # of the samples (align.run's sampled scores use the run's seed + 1)
  config.verifier = "exact"  # the task's reward that ranks best-of-N's samples ('exact': the oracle, pass@N)
  config.reward_seq_len = 128  # the reward model reads prompt + completion cut to this many tokens
  # Budget forcing (infer.BudgetForcing): thinking is the worked solution before the task's answer line.
  config.budgets = (0, 4, 8, 16, 32, 64)  # thinking tokens: the end of thinking is forced there
  config.budget_modes = ("maximum", "exact")  # one curve each; 'exact': before the budget an end of thinking
  config.budget_continuation = " Wait"  # is replaced by this (s1's "Wait")
  config.budget_temperature = 0.0  # one answer per problem per budget (0: greedy)
  config.budget_answer_tokens = 16  # room after the forced answer prefix
  config.serve_problems = 200  # the trade-off panel: total FLOPs = training + this many problems' inference
  config.rows_per_call = 256  # rows per generate call
  return config
