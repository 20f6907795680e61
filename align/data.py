"""Alignment data: JSONL records -> token arrays with completion-only loss masks -> packed batches.

Formats (one JSON object per line):
  SFT           {"prompt": str, "completion": str}  or  {"messages": [{"role", "content"}, ...]}
                (messages are rendered by a chat template, align/chat.py; only assistant turns train)
  preferences   {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}
  rankings      {"prompt": str, "responses": [str, ...], "scores": [float, ...]}  (RRHF; higher is better)
  prompts       {"prompt": str}  (what the online methods sample completions for)
  problems      {"prompt": str, "answer": str or number, "solution": str (optional)}  (align/tasks/jsonl.py)

A malformed line raises a `DataError` naming the file and line, or is skipped (with a count in the
log) when the policy is 'skip'. SFT examples are packed several to a row with grain's first-fit
packing (no example is split; a row's examples are told apart by segment_ids), giving the batch
dict of train/data.py: tokens, targets, segment_ids, positions, loss_mask, all [B, T] int32.
"""

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from align import chat

ON_ERROR = ("raise", "skip")
_SFT_KEYS = ({"prompt", "completion"}, {"messages"})
_PREFERENCE_KEYS = {"prompt", "chosen", "rejected"}


class DataError(ValueError):
  """A malformed record; the message names the file and line."""


def _check_sft(record) -> str | None:
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  if "messages" in record:
    try:
      chat.render(record["messages"], "plain")
    except ValueError as e:
      return str(e)
    return None
  for key in ("prompt", "completion"):
    if not isinstance(record.get(key), str):
      return f"needs string fields 'prompt' and 'completion' (or 'messages'); {key!r} is {record.get(key)!r:.60}"
  return None


def _check_preference(record) -> str | None:
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  for key in sorted(_PREFERENCE_KEYS):
    if not isinstance(record.get(key), str):
      return f"needs string fields {sorted(_PREFERENCE_KEYS)}; {key!r} is {record.get(key)!r:.60}"
  if "margin" in record and not isinstance(record["margin"], (int, float)):
    return f"'margin' must be a number, got {record['margin']!r:.60}"
  return None


def _check_ranking(record) -> str | None:
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  if not isinstance(record.get("prompt"), str):
    return f"needs a string field 'prompt'; it is {record.get('prompt')!r:.60}"
  responses, scores = record.get("responses"), record.get("scores")
  if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
    return f"'responses' must be a non-empty list of strings, got {responses!r:.60}"
  if (not isinstance(scores, list) or len(scores) != len(responses)
      or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores)):
    return f"'scores' must be a list of {len(responses)} numbers (one per response), got {scores!r:.60}"
  return None


def _check_prompt(record) -> str | None:
  if not isinstance(record, dict):
    return f"expected a JSON object, got {type(record).__name__}"
  if not isinstance(record.get("prompt"), str):
    return f"needs a string field 'prompt'; it is {record.get('prompt')!r:.60}"
  return None


def _check_problem(record) -> str | None:
  problem = _check_prompt(record)
  if problem is not None:
    return problem
  if not isinstance(record.get("answer"), (str, int, float)) or isinstance(record.get("answer"), bool):
    return f"needs a field 'answer' (a string or a number); it is {record.get('answer')!r:.60}"
  if "solution" in record and not isinstance(record["solution"], str):
    return f"'solution' must be a string, got {record['solution']!r:.60}"
  return None


_CHECKS = {"sft": _check_sft, "preference": _check_preference, "ranking": _check_ranking, "prompt": _check_prompt,
           "problem": _check_problem}


def read_jsonl(path: str | Path, kind: str, *, on_error: str = "raise") -> list[dict]:
  """Records of `kind` ('sft', 'preference', 'ranking', 'prompt' or 'problem') from a JSONL file, checked line by line."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r} is not one of {ON_ERROR}")
  check = _CHECKS.get(kind)
  if check is None:
    raise ValueError(f"kind={kind!r} is not one of {tuple(_CHECKS)}")
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no JSONL file at {path}")
  records, skipped = [], 0
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        problem = check(record)
      except json.JSONDecodeError as e:
        problem = f"invalid JSON ({e.msg} at column {e.colno})"
      if problem is None:
        records.append(record)
      elif on_error == "skip":
        skipped += 1
      else:
        raise DataError(f"{path}:{number}: {problem}")
  if skipped:
    logging.warning("%s: skipped %d malformed lines", path, skipped)
  return records


def save_npz_atomic(path: str | Path, **arrays) -> None:
  """np.savez to a temp file renamed into place: a crash never leaves a half-written file."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp.npz")
  np.savez(tmp, **arrays)
  tmp.replace(path)


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
  """Writes records atomically (a temp file renamed into place)."""
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  tmp.replace(path)


def pieces_of(record: dict, template: str) -> list[tuple[str, bool]]:
  if "messages" in record:
    return chat.render(record["messages"], template)
  return chat.prompt_completion(record["prompt"], record["completion"])


def tokenize_pieces(pieces: Sequence[tuple[str, bool]], tokenizer, *, add_bos: bool = True,
                    add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """ids [n] and trainable [n] (bool); eos follows the last piece and trains when that piece does."""
  ids, trainable = [], []
  if add_bos and tokenizer.bos_id >= 0:
    ids.append(tokenizer.bos_id)
    trainable.append(False)
  for text, train in pieces:
    piece = tokenizer.encode(text)
    ids += piece
    trainable += [train] * len(piece)
  if add_eos and tokenizer.eos_id >= 0:
    ids.append(tokenizer.eos_id)
    trainable.append(bool(pieces) and pieces[-1][1])
  return np.asarray(ids, np.int32), np.asarray(trainable, bool)


def prompt_completion_ids(record: dict, tokenizer, *, template: str = "plain") -> tuple[list[int], list[int]]:
  """A record's ids as the SFT data tokenizes them (bos, pieces, eos), cut before the first trained
  token: (prompt ids, completion ids)."""
  ids, trainable = tokenize_pieces(pieces_of(record, template), tokenizer)
  cut = int(np.argmax(trainable))
  return ids[:cut].tolist(), ids[cut:].tolist()


def sft_features(record: dict, tokenizer, *, template: str, seq_len: int) -> dict[str, np.ndarray]:
  """inputs, targets, target_mask (1 where the target token is trained on), cut to seq_len."""
  ids, trainable = tokenize_pieces(pieces_of(record, template), tokenizer)
  ids, trainable = ids[: seq_len + 1], trainable[: seq_len + 1]
  return {"inputs": ids[:-1], "targets": ids[1:], "target_mask": trainable[1:].astype(np.int32)}


def _collate(rows, num_rows: int) -> dict[str, np.ndarray]:
  seq_len = len(rows[0]["inputs"])
  batch = {k: np.zeros((num_rows, seq_len), np.int32)
           for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
  for i, row in enumerate(rows):
    batch["tokens"][i] = row["inputs"]
    batch["targets"][i] = row["targets"]
    batch["segment_ids"][i] = row["inputs_segment_ids"]
    batch["positions"][i] = row["inputs_positions"]
    batch["loss_mask"][i] = row["target_mask"] * (row["inputs_segment_ids"] > 0)
  return batch


def make_sft_dataset(records: Sequence[dict], tokenizer, *, template: str, seq_len: int, global_batch_size: int,
                     seed: int, split: str, process_index: int = 0, process_count: int = 1,
                     num_packing_bins: int = 16) -> grain.IterDataset:
  """This process's packed SFT batches: 'train' shuffles and repeats forever, 'eval' is one pass."""
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
  if not records:
    raise ValueError(f"the {split} split has no SFT records")
  ds = grain.MapDataset.source(list(records))
  if split == "train":
    ds = ds.shuffle(seed=seed % 2**32).repeat(None)
  features = functools.partial(sft_features, tokenizer=tokenizer, template=template, seq_len=seq_len)
  ds = ds.map(features).to_iter_dataset()
  lengths = {"inputs": seq_len, "targets": seq_len, "target_mask": seq_len}
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=split == "train"
  )
  rows = global_batch_size // process_count
  ds = ds.batch(global_batch_size, drop_remainder=split == "train",
                batch_fn=functools.partial(_collate, num_rows=global_batch_size))
  lo, hi = process_index * rows, (process_index + 1) * rows
  return ds.map(lambda batch: {k: v[lo:hi] for k, v in batch.items()})
