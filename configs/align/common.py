"""Keys shared by the align/ configs: the trainer's keys plus `method`, the task and each method's block."""

from typing import Any

import ml_collections

from configs import common

METHODS = ("sft", "dpo", "reward")


def task_config() -> ml_collections.ConfigDict:
  """Where examples come from: 'arithmetic' (align/tasks) generates them; '' reads the method's JSONL files."""
  c = ml_collections.ConfigDict()
  c.name = ""
  c.difficulty = 2
  c.train_size = 4000
  c.eval_size = 200  # held-out examples / pairs (another seed)
  c.seed = 0
  c.accuracy_problems = 0  # >0: exact-match accuracy of greedy answers on that many held-out problems
  c.accuracy_tokens = 64  # the generation budget for those answers
  return c


def sft_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train_path = ""  # JSONL: {"prompt", "completion"} or {"messages": [...]}
  c.eval_path = ""
  c.template = "plain"  # align/chat.py: chatml, llama3, gemma, plain (for 'messages' records)
  c.on_error = "raise"  # a malformed JSONL line: 'raise' or 'skip'
  return c


def dpo_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train_path = ""  # JSONL: {"prompt", "chosen", "rejected", "margin" (optional)}
  c.eval_path = ""
  c.on_error = "raise"
  c.loss_type = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing), robust, ipo, hinge, simpo
  c.beta = 0.1
  c.label_smoothing = 0.0
  c.gamma = 0.5  # SimPO's target margin
  c.sft_coef = 0.0  # RPO: + sft_coef * per-token NLL of the chosen completions (0: plain DPO)
  c.pairs = "data"  # 'data': the task's or the JSONL pairs; 'ai_feedback': the starting policy's samples, judged
  c.ai_feedback_samples = 4  # completions per prompt
  c.ai_feedback_temperature = 1.0
  return c


def reward_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.use_margin = False  # subtract each pair's "margin" (Llama 2)
  c.center_coef = 0.0  # reward centering: + center_coef * mean((r_c + r_r)^2)
  return c


def align_config(method: str, **overrides: Any) -> ml_collections.ConfigDict:
  config = common.train_config(**overrides)
  config.method = method
  config.task = task_config()
  config.sft = sft_config()
  config.dpo = dpo_config()
  config.reward = reward_config()
  return config
