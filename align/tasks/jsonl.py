"""A task from JSONL files: `{"prompt", "answer"}` records, with an optional worked `"solution"`.

  --config.task.name=jsonl --config.task.path=train.jsonl[,more.jsonl] [--config.task.eval_path=test.jsonl]

A gold answer written GSM8K-style ('worked steps ... #### 42') gives the answer 42 and, where the
record has no "solution", the whole text as the worked solution. Without eval_path the last
`task.eval_size` records of the files are held out. `task.answer_pattern` (a regex with one group)
reads a completion's answer; by default an `Answer:` line, else `#### N`, else the last number
(align/tasks/answers.py). The reward 'exact' is 1.0 when the normalised answers are equal.
"""

import logging

from align import data
from align.tasks import answers, base


def _problem(record: dict) -> base.Problem:
  answer, worked = answers.gold_answer(str(record["answer"]))
  return base.Problem(prompt=record["prompt"], answer=answer, solution=record.get("solution", worked), source=record)


def _read(spec: str, key: str) -> list[base.Problem]:
  paths = [p.strip() for p in spec.split(",") if p.strip()]
  if not paths:
    raise ValueError(f"{key} is empty: give one or more JSONL files of {{\"prompt\", \"answer\"}} records")
  problems = []
  for path in paths:
    try:
      records = data.read_jsonl(path, "problem")
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{key}={spec!r}: {e}") from e
    problems += [_problem(r) for r in records]
  if not problems:
    raise ValueError(f"{key}={spec!r} holds no records")
  return problems


def make_task(config) -> base.Task:
  """The task of `config.task` (path, eval_path, eval_size, answer_pattern); reads the files now, so
  a bad file is reported before any training starts."""
  pattern = answers.compile_pattern(config["answer_pattern"]) if config["answer_pattern"] else None
  train = _read(config["path"], "config.task.path")
  if config["eval_path"]:
    held_out = _read(config["eval_path"], "config.task.eval_path")
  else:
    size = int(config["eval_size"])
    if not 0 < size < len(train):
      raise ValueError(f"config.task.eval_size={size} must be in 1..{len(train) - 1} to hold out records of "
                       f"config.task.path (it has {len(train)}), or give config.task.eval_path")
    train, held_out = train[:-size], train[-size:]
  splits = {"train": train, "eval": held_out}

  def split_problems(split: str, n: int | None, seed: int) -> list[base.Problem]:
    del seed  # a file's records, in file order
    problems = splits[split]
    if n is not None and n < len(problems):
      logging.info("task jsonl: the first %d of %d %s records", n, len(problems), split)
      problems = problems[:n]
    return problems

  def extract(text: str) -> str | None:
    return answers.extract(text, pattern)

  def exact(problem: base.Problem, completion: str) -> float:
    return float(extract(completion) == problem.answer)

  return base.Task(name="jsonl", problems=split_problems, extract_answer=extract, rewards={"exact": exact})
