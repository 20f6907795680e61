"""Supervised fine-tuning: the next-token loss of train/ on completion (assistant) tokens only.

The method is its data: align/data.py gives loss_mask = 1 only on completion tokens, so the
loss function is pre-training's own. `config.task` / `config.sft` (configs/align/common.py) say where
examples come from: the synthetic arithmetic task of align/tasks, or JSONL files.
"""

import functools

import jax
import ml_collections

from align import chat, data
from align.method import Method, check_choice
from align.tasks import Task, split_problems
from train import losses


def records(config: ml_collections.ConfigDict, split: str, task: Task | None) -> list[dict]:
  """The split's examples: the task's problems with their worked solutions, or config.sft's JSONL files."""
  if task is not None:
    return [{"prompt": p.prompt, "completion": p.completion()} for p in split_problems(task, config.task, split)]
  c = config.sft
  path = c.train_path if split == "train" else c.eval_path
  if not path:
    raise ValueError(f"config.sft.{split}_path is empty and config.task.name is ''")
  return data.read_jsonl(path, "sft", on_error=c.on_error)


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context, task: Task | None):
  del context
  return data.make_sft_dataset(
      records(config, split, task), tokenizer, template=config.sft.template, seq_len=config.seq_len,
      global_batch_size=config.batch_size, seed=config.seed, split=split, process_index=jax.process_index(),
      process_count=jax.process_count(),
  )


def validate(config: ml_collections.ConfigDict, task: Task | None) -> None:
  del task
  check_choice(config, "sft.on_error", data.ON_ERROR)
  check_choice(config, "sft.template", chat.TEMPLATES)


def loss_fn(config: ml_collections.ConfigDict):
  return functools.partial(losses.next_token_loss, z_loss=config.z_loss)


METHOD = Method(name="sft", loss_fn=loss_fn, make_dataset=make_dataset, validate=validate)
