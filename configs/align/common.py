"""Keys shared by the align/ configs: the trainer's keys plus `method` and each method's block."""

from typing import Any

import ml_collections

from configs import common

METHODS = ("sft",)


def sft_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = ""  # 'arithmetic': the synthetic task of align/tasks; '': JSONL files
  c.task_difficulty = 2
  c.task_train_size = 4000
  c.task_eval_size = 200
  c.task_seed = 0
  c.train_path = ""
  c.eval_path = ""
  c.template = "plain"  # align/chat.py: chatml, llama3, gemma, plain (for 'messages' records)
  c.on_error = "raise"  # a malformed JSONL line: 'raise' or 'skip'
  return c


def align_config(method: str, **overrides: Any) -> ml_collections.ConfigDict:
  config = common.train_config(**overrides)
  config.method = method
  config.sft = sft_config()
  config.eval_accuracy_problems = 0  # >0: exact-match accuracy of greedy answers on that many held-out problems
  config.eval_accuracy_tokens = 64
  return config
