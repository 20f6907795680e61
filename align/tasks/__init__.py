"""Tasks as plug-ins: where problems, their answers and their rewards come from (align/tasks/base.py).

config.task.name picks one: 'arithmetic' (a synthetic task with worked solutions), 'jsonl'
(`{"prompt", "answer"}` records from config.task.path), or 'package.module:function', a factory
called with the config.task block that returns a `Task`. '' means no task: the methods then read
their own JSONL files (config.sft.train_path, config.dpo.train_path, config.rl.prompts_path).
"""

import importlib

from align.tasks import arithmetic, jsonl
from align.tasks.base import ANSWER_PREFIX, Problem, Reward, Task

BUILT_IN = {"arithmetic": arithmetic.make_task, "jsonl": jsonl.make_task}

__all__ = ["ANSWER_PREFIX", "BUILT_IN", "Problem", "Reward", "Task", "get_task", "split_problems"]


def _factory(name: str):
  module_name, _, function_name = name.partition(":")
  if not module_name or not function_name:
    raise ValueError(f"config.task.name={name!r} is not one of {sorted(BUILT_IN)} nor a factory 'package.module:function'")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    raise ValueError(f"config.task.name={name!r}: the module {module_name!r} cannot be imported ({e})") from e
  factory = getattr(module, function_name, None)
  if not callable(factory):
    raise ValueError(f"config.task.name={name!r}: the module {module_name!r} has no function {function_name!r}")
  return factory


def get_task(config) -> Task | None:
  """The Task that `config` (the config.task block: a ConfigDict or a dict) names; None for ''."""
  name = config["name"]
  if not name:
    return None
  factory = BUILT_IN.get(name) or _factory(name)
  task = factory(config)
  if not isinstance(task, Task):
    raise ValueError(f"config.task.name={name!r} returned {type(task).__name__}, not an align.tasks.Task")
  return task


def split_problems(task: Task, task_config, split: str) -> list[Problem]:
  """The problems of a run's split: train_size of 'train', eval_size of 'eval', from task_config.seed."""
  n = task_config["train_size"] if split == "train" else task_config["eval_size"]
  return task.split(split, n, task_config["seed"])
