"""Supervised fine-tuning: the next-token loss of train/ on completion (assistant) tokens only.

The method is its data: align/data.py gives loss_mask = 1 only on completion tokens, so the
loss function is pre-training's own. `config.sft` (configs/align/common.py) says where examples
come from: JSONL files, or the synthetic arithmetic task of align/tasks.
"""

import functools

import jax
import ml_collections

from align import data
from align.tasks import arithmetic
from train import losses


def records(config: ml_collections.ConfigDict, split: str) -> list[dict]:
  c = config.sft
  if c.task == "arithmetic":
    n, seed = (c.task_train_size, c.task_seed) if split == "train" else (c.task_eval_size, c.task_seed + 1)
    return arithmetic.sft_examples(n, difficulty=c.task_difficulty, seed=seed)
  path = c.train_path if split == "train" else c.eval_path
  if not path:
    raise ValueError(f"config.sft.{'train' if split == 'train' else 'eval'}_path is empty and config.sft.task is ''")
  return data.read_jsonl(path, "sft", on_error=c.on_error)


def make_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str):
  return data.make_sft_dataset(
      records(config, split), tokenizer, template=config.sft.template, seq_len=config.seq_len,
      global_batch_size=config.batch_size, seed=config.seed, split=split, process_index=jax.process_index(),
      process_count=jax.process_count(),
  )


def loss_fn(config: ml_collections.ConfigDict):
  return functools.partial(losses.next_token_loss, z_loss=config.z_loss)
