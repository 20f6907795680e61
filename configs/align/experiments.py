"""What the experiment files share: the offline and the online methods' settings, and the arithmetic variant (part
1's SFT checkpoint on the arithmetic task) that the *_arithmetic.py files are."""

import ml_collections

from configs import common
from configs.align.common import align_config


def offline_config(method: str, arg, *, warmup_steps: int) -> ml_collections.ConfigDict:
  """SFT and the DPO family. arg: parsed with at least steps and lr; held-out loss a third of the way."""
  config = align_config(method)
  config.total_steps = arg.steps
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 25
  config.eval_every = max(arg.steps // 3, 1)
  config.eval_steps = 4
  config.checkpoint_every = 200
  config.task.accuracy_problems = 200  # the same held-out problems in every experiment
  config.model = common.model_config("tiny")  # placeholders only: the architecture comes from init_from
  config.optimizer.learning_rate = arg.lr
  config.optimizer.warmup_steps = warmup_steps
  config.optimizer.weight_decay = 0.0
  return config


def online_config(method: str, arg) -> ml_collections.ConfigDict:
  """arg: parsed with at least steps, lr, prompts. Measured by held-out scores and the KL to the
  starting policy; the task and init_from come from the command line (or `on_arithmetic`)."""
  config = align_config(method)
  config.total_steps = arg.steps
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 10
  config.eval_every = 0  # measured by generation, not by a held-out loss
  config.checkpoint_every = 100
  config.task.train_size = 2000
  config.task.accuracy_problems = 200
  config.task.measure_kl = True
  config.task.sampled_samples = 4  # also what the methods optimize: one temperature-1 sample's reward, pass@4
  config.rl.prompts_per_iteration = arg.prompts
  config.rl.max_new_tokens = 64
  config.rl.reward = arg.reward
  config.model = common.model_config("tiny")  # placeholders only: the architecture comes from init_from
  config.optimizer.learning_rate = arg.lr
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 5
  config.optimizer.weight_decay = 0.0
  return config


def on_arithmetic(config: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """The arithmetic task at arg.difficulty, starting from arg.init."""
  config.init_from = arg.init
  config.task.name = "arithmetic"
  config.task.difficulty = arg.difficulty
  return config
