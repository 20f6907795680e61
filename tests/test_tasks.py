"""Tasks as plug-ins: answer extraction and normalisation on hand-made completions, the JSONL task,
a Python-factory task, bad task specs named before training, and both kinds of task trained
through `python -m align` (an SFT step, then GRPO steps from it) with held-out scoring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from align import run as align_run
from align import tasks
from align.tasks import answers
from configs import validation
from configs.align.common import align_config
from rundir import tokenizer as tokenizer_lib
from tests import xla_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("completion, expected", [
    (" 3 + 4 = 7.\nAnswer: 7", "7"),
    ("Answer: 1,234,567", "1234567"),
    ("Answer: -12", "-12"),
    ("Answer: 42.0", "42"),
    ("Answer: 42.", "42"),
    ("Answer: $1,000", "1000"),
    ("Answer: blue whale", "blue whale"),
    ("Answer: 5\nlater: Answer: 6", "6"),  # the last answer line
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),  # GSM8K
    ("#### -3.50", "-3.50"),
    ("so the total is 18 apples, minus 3 is 15", "15"),  # the last number
    ("the change was -2,500 dollars", "-2500"),
    ("no number here", None),
    ("Answer:   \n", None),
])
def test_default_extraction_and_normalisation(completion, expected):
  assert answers.extract(completion) == expected


def test_a_pattern_with_one_group_and_normalisation():
  pattern = answers.compile_pattern(r"\\boxed\{([^}]*)\}")
  assert answers.extract(r"so \boxed{ 1,024 } and \boxed{2,048.0}", pattern) == "2048"
  assert answers.extract("nothing boxed", pattern) is None
  assert [answers.normalize(t) for t in (" 7 ", "+7", "7.00", "-0", "1,5", "a  b")] == ["7", "7", "7", "0", "1,5", "a b"]
  assert answers.gold_answer("She has 3 + 4 = 7 apples.\n#### 7") == ("7", "She has 3 + 4 = 7 apples.\n#### 7")
  assert answers.gold_answer(" 1,200 ") == ("1200", None)


def _records(n: int, offset: int = 0) -> list[dict]:
  """Small additions written three ways: with a worked solution, GSM8K-style, and the answer alone."""
  out = []
  for i in range(offset, offset + n):
    a, b = i % 7 + 1, (3 * i) % 5 + 1
    prompt = f"Question: What is {a} + {b}?\nSolution:"
    if i % 3 == 0:
      out.append({"prompt": prompt, "answer": a + b, "solution": f" {a} + {b} = {a + b}.\nAnswer: {a + b}"})
    elif i % 3 == 1:
      out.append({"prompt": prompt, "answer": f" {a} + {b} = {a + b}.\n#### {a + b}"})
    else:
      out.append({"prompt": prompt, "answer": str(a + b)})
  return out


def _write_jsonl(path: Path, records) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_the_jsonl_task_reads_splits_and_rewards(tmp_path):
  train = _write_jsonl(tmp_path / "train.jsonl", _records(30))
  config = align_config("grpo").task
  config.update(name="jsonl", path=str(train), eval_size=6)
  task = tasks.get_task(config)
  problems = task.split("train", None, 0)
  held_out = task.split("eval", None, 0)
  assert len(problems) == 24 and len(held_out) == 6  # the last eval_size records are held out
  assert [p.prompt for p in held_out] == [r["prompt"] for r in _records(30)[24:]]
  gsm8k = problems[1]
  assert gsm8k.answer == str(_records(2)[1]["answer"]).split("####")[-1].strip()
  assert gsm8k.solution.endswith(f"#### {gsm8k.answer}")  # GSM8K's worked text is the solution
  plain = problems[2]
  assert plain.solution is None and plain.completion() == f" Answer: {plain.answer}"
  exact = task.reward("exact")
  assert exact(plain, f"Answer: {plain.answer}") == 1.0 and exact(plain, "Answer: 99") == 0.0
  assert exact(problems[0], problems[0].completion()) == 1.0 and exact(gsm8k, gsm8k.completion()) == 1.0
  assert task.split("train", 5, 0) == problems[:5]
  config.eval_path = str(_write_jsonl(tmp_path / "eval.jsonl", _records(4, offset=100)))
  assert len(tasks.get_task(config).split("eval", None, 0)) == 4


FACTORY = '''
from align import tasks


def make_task(config):
  """Which of two words is longer: the answer is the longer word; a factory a researcher writes."""
  words = ["cat", "horse", "ox", "zebra", "eel", "tiger", "ant", "camel", "bee", "lion"]
  pairs = [(a, b) for a in words for b in words if len(a) != len(b)]

  def problems(split, n, seed):
    chosen = pairs[0::2] if split == "train" else pairs[1::2]
    out = [tasks.Problem(prompt=f"Question: Which is longer, {a} or {b}?\\nSolution:",
                         answer=max(a, b, key=len), solution=f" Answer: {max(a, b, key=len)}") for a, b in chosen]
    return out if n is None else out[:n]

  def extract(text):
    return tasks.answers.extract(text)

  def exact(problem, completion):
    return float(extract(completion) == problem.answer)

  return tasks.Task(name="longer_word", problems=problems, extract_answer=extract, rewards={"exact": exact})
'''


def test_a_factory_task_is_built_from_its_module(tmp_path, monkeypatch):
  (tmp_path / "my_tasks.py").write_text(FACTORY)
  monkeypatch.syspath_prepend(str(tmp_path))
  task = tasks.get_task({"name": "my_tasks:make_task"})
  problem = task.split("eval", 3, 0)[0]
  assert task.name == "longer_word" and task.rewards["exact"](problem, f"Answer: {problem.answer}") == 1.0


def _bad(tmp_path, reward="exact", **task):
  config = align_config("grpo")
  config.task.update(task)
  config.rl.reward = reward
  with pytest.raises(validation.ConfigError) as raised:
    align_run.validate(config)
  return str(raised.value)


def test_bad_task_specs_are_named_before_training(tmp_path, monkeypatch):
  missing = str(tmp_path / "missing.jsonl")
  assert "config.task.path" in _bad(tmp_path, name="jsonl", path=missing) and missing in _bad(
      tmp_path, name="jsonl", path=missing)
  no_answer = _write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
  assert f"{no_answer}:2" in _bad(tmp_path, name="jsonl", path=str(no_answer))
  no_prompt = _write_jsonl(tmp_path / "no_prompt.jsonl", [{"question": "a", "answer": "1"}])
  assert f"{no_prompt}:1" in _bad(tmp_path, name="jsonl", path=str(no_prompt))
  good = str(_write_jsonl(tmp_path / "good.jsonl", _records(10)))
  message = _bad(tmp_path, name="jsonl", path=good, eval_size=3, answer_pattern=r"Answer: \d+")
  assert "config.task.answer_pattern" in message and "exactly one group" in message
  assert "no_such_module_xyz" in _bad(tmp_path, name="no_such_module_xyz:make_task")
  (tmp_path / "my_tasks.py").write_text(FACTORY)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert "no function 'make_it'" in _bad(tmp_path, name="my_tasks:make_it")
  assert "config.task.name='chess'" in _bad(tmp_path, name="chess")
  assert "config.rl.reward='digits'" in _bad(tmp_path, name="jsonl", path=good, eval_size=3, reward="digits")


TINY = ["--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.seq_len=64", "--config.task.accuracy_problems=4", "--config.task.accuracy_tokens=8",
        "--config.task.sampled_samples=2", "--config.log_every=1", "--config.mesh.data=2",
        "--config.optimizer.warmup_steps=0"]


def _align(tmp_path, config: str, workdir: Path, *flags: str) -> str:
  """`python -m align` in a subprocess on 2 host devices; returns its stdout."""
  env = xla_env.subprocess_env(2, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  command = [sys.executable, "-m", "align", f"--config={config}", f"--workdir={workdir}", *TINY, *flags]
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  texts = [r["prompt"] + r.get("solution", " Answer: " + str(r["answer"])) for r in _records(200)]
  texts += [f"Question: Which is longer, {a} or {b}?\nSolution: Answer: {a}" for a in ("cat", "horse", "zebra")
            for b in ("ox", "eel", "ant")]
  tokenizer_lib.train_tokenizer(texts, path, vocab_size=320)
  return path


@pytest.mark.parametrize("kind", ["jsonl", "factory"])
def test_a_task_trains_sft_then_grpo_through_python_m_align(kind, tokenizer_path, tmp_path):
  """An SFT step on the task's solutions, then two GRPO steps from it on the task's exact reward;
  both report the task's held-out scores before and after."""
  if kind == "jsonl":
    path = _write_jsonl(tmp_path / "train.jsonl", _records(40))
    task = ["--config.task.name=jsonl", f"--config.task.path={path}", "--config.task.eval_size=8"]
  else:
    (tmp_path / "my_tasks.py").write_text(FACTORY)
    task = ["--config.task.name=my_tasks:make_task"]
  common = [f"--config.tokenizer.path={tokenizer_path}", *task]
  sft = _align(tmp_path, "configs/align/sft.py:steps=1", tmp_path / "sft", *common, "--config.batch_size=4",
               "--config.eval_every=1", "--config.eval_steps=1")
  assert "held-out problems of task" in sft and "exact-match accuracy (greedy)" in sft
  assert (tmp_path / "sft" / "checkpoints" / "1").is_dir()
  grpo = _align(tmp_path, "configs/align/grpo.py:steps=2,prompts=2,group=2,batch=4,accum=2", tmp_path / "grpo",
                *common, f"--config.init_from={tmp_path / 'sft'}", "--config.rl.max_new_tokens=8")
  for line in ("exact-match accuracy (greedy)", "pass@2 (exact)", "self-consistency over 2 samples",
               "KL to the starting policy"):
    assert line in grpo, grpo
  assert (tmp_path / "grpo" / "checkpoints" / "2").is_dir()
