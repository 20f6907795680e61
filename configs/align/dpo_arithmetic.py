"""DPO on the arithmetic task's preference pairs (correct versus wrong worked solutions), from SFT:

  python -m align --config=configs/align/sft_arithmetic.py --workdir=runs/sft
  python -m align --config=configs/align/dpo_arithmetic.py --workdir=runs/dpo

Variants: `:steps=N`, `:init=DIR`, `:difficulty=D`, `:loss=sigmoid|robust|ipo|hinge|simpo|orpo`, `:beta=B`,
`:sft=A` (RPO: + A * NLL of chosen), `:lr=X`, `:pairs=ai_feedback` (RLAIF / dDPO: the starting policy's own samples, best versus worst by the
exact-match judge, instead of the task's correct-versus-wrong pairs).
The reference log-probs are the starting model's, computed once into the workdir.
The task's pairs are far off-policy (the SFT model already puts the rejected ~33 nats below the
chosen), so DPO is met by pushing both down: at lr 2e-4 the chosen log-prob fell from -4.7 to -21
and accuracy collapsed (0.205 -> 0.010); hence lr 1e-5 by default, and `:sft=1.0` (RPO) holds the
chosen up (README, Alignment).
"""

from configs import common
from configs.align.common import align_config


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=150, init="runs/sft", difficulty=2, loss="sigmoid", beta=0.1, pairs="data", sft=0.0, lr=1e-5)
  config = align_config("dpo")
  config.init_from = arg.init
  config.total_steps = arg.steps
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 25
  config.eval_every = max(arg.steps // 3, 1)
  config.eval_steps = 4
  config.checkpoint_every = 200
  config.task.name = "arithmetic"
  config.task.difficulty = arg.difficulty
  config.task.train_size = 2000 if arg.pairs == "data" else 400  # prompts to sample for AI feedback
  config.task.accuracy_problems = 200  # the same held-out problems in every experiment
  config.task.measure_kl = True  # KL(policy || the SFT policy it started from)
  config.dpo.loss_type = arg.loss
  config.dpo.beta = arg.beta
  config.dpo.pairs = arg.pairs
  config.dpo.sft_coef = arg.sft
  config.dpo.ai_feedback_samples = 8
  config.model = common.model_config("tiny")  # placeholders only: the architecture comes from init_from
  config.optimizer.learning_rate = arg.lr
  config.optimizer.warmup_steps = 10
  config.optimizer.weight_decay = 0.0
  return config
