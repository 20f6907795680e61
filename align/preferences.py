"""Preference pairs: `{"prompt", "chosen", "rejected", "margin"}` records from the task or from
JSONL files, as token rows for the DPO family and for reward models.

A batch row is one pair: chosen_* and rejected_* [B, T] (prompt + completion, right-padded; the
mask covers completion tokens only) and the pair's margin [B].
"""

import grain
import jax
import ml_collections
import numpy as np

from align import chat, data
from align.tasks import Task, split_problems
from train import flops as flops_lib


def row_flops(config: ml_collections.ConfigDict, module) -> float:
  """A train step's row of pairs: two sequences (chosen and rejected), forward and backward."""
  return flops_lib.trained(module.config, config.seq_len, 2)


def records(config: ml_collections.ConfigDict, split: str, task: Task | None) -> list[dict]:
  """The split's pairs: the task's right versus wrong completions, or config.dpo's JSONL files."""
  if task is not None:
    if task.wrong_completion is None:
      raise ValueError(f"task {task.name!r} makes no wrong completions, so it gives no preference pairs: use "
                       "config.dpo.pairs='ai_feedback' (the policy's samples, judged by the task's reward) or "
                       "config.task.name='' with config.dpo.train_path")
    return [{"prompt": p.prompt, "chosen": p.completion(), "rejected": task.wrong_completion(p)}
            for p in split_problems(task, config.task, split)]
  c = config.dpo
  path = c.train_path if split == "train" else c.eval_path
  if not path:
    raise ValueError(f"config.dpo.{split}_path is empty and config.task.name is ''")
  return data.read_jsonl(path, "preference", on_error=c.on_error)


def completion_features(prompt: str, completion: str, tokenizer, *, seq_len: int) -> dict[str, np.ndarray]:
  """tokens, targets, mask [T] int32 of prompt + completion (bos, eos), right-padded; the mask on
  the completion's targets."""
  ids, trainable = data.tokenize_pieces(chat.prompt_completion(prompt, completion), tokenizer)
  ids, trainable = ids[: seq_len + 1], trainable[: seq_len + 1]
  n = len(ids) - 1
  out = {}
  for name, values in (("tokens", ids[:-1]), ("targets", ids[1:]), ("mask", trainable[1:])):
    out[name] = np.zeros(seq_len, np.int32)
    out[name][:n] = values
  return out


def pair_features(record: dict, tokenizer, *, seq_len: int) -> dict[str, np.ndarray]:
  """chosen_/rejected_ tokens, targets, mask [T] (mask on completion targets) and margin []."""
  out = {"margin": np.float32(record.get("margin", 0.0))}
  for side in ("chosen", "rejected"):
    features = completion_features(record["prompt"], record[side], tokenizer, seq_len=seq_len)
    out.update({f"{side}_{name}": values for name, values in features.items()})
  return out


def batched(rows: list[dict], config: ml_collections.ConfigDict, split: str):
  """This process's rows of each global batch of pairs; 'train' shuffles and repeats forever."""
  ds = grain.MapDataset.source(rows)
  if split == "train":
    ds = ds.shuffle(seed=config.seed % 2**32).repeat(None)
  ds = ds.to_iter_dataset().batch(config.batch_size, drop_remainder=split == "train")
  per_process = config.batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  return ds.map(lambda batch: {k: np.asarray(v)[lo: lo + per_process] for k, v in batch.items()})
