"""Supervised fine-tuning: the next-token loss of train/ on completion (assistant) tokens only.

The method is its data: align/data.py gives loss_mask = 1 only on completion tokens, so the
loss function is pre-training's own. `config.task` / `config.sft` (configs/align/common.py) say where
examples come from: the synthetic arithmetic task of align/tasks, or JSONL files.
"""

import functools

import jax
import ml_collections

from align import data
from align.tasks import arithmetic
from train import losses


def records(config: ml_collections.ConfigDict, split: str) -> list[dict]:
  c, task = config.sft, config.task
  if task.name == "arithmetic":
    n, seed = (task.train_size, task.seed) if split == "train" else (task.eval_size, task.seed + 1)
    return arithmetic.sft_examples(n, difficulty=task.difficulty, seed=seed)
  path = c.train_path if split == "train" else c.eval_path
  if not path:
    raise ValueError(f"config.sft.{split}_path is empty and config.task.name is ''")
  return data.read_jsonl(path, "sft", on_error=c.on_error)


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, **context):
  del context
  return data.make_sft_dataset(
      records(config, split), tokenizer, template=config.sft.template, seq_len=config.seq_len,
      global_batch_size=config.batch_size, seed=config.seed, split=split, process_index=jax.process_index(),
      process_count=jax.process_count(),
  )


def loss_fn(config: ml_collections.ConfigDict):
  return functools.partial(losses.next_token_loss, z_loss=config.z_loss)
