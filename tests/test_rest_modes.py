"""ReST's two paper-faithful modes without a model: self-consistency's majority vote (ties, paths
without an answer, min_agreement) and that it never calls a reward; STaR with restarts: its steps per
outer iteration, the growing set of rationales, the restart asked of the trainer once per outer
iteration, and a resumed source that builds the next set from the saved one. The same modes on a
real tiny model: tests/test_align_rl.py."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from align import online, rest, rollout, tasks
from align.tasks import arithmetic
from configs.align import rest_arithmetic
from configs.align.common import align_config
from train import trainer


def test_majority_vote_keeps_the_paths_that_state_the_majority():
  kept, majority = rest.select_majority(["5", "5", "7", None], 4, 0.0)
  assert kept.tolist() == [0, 1] and majority == ["5"]
  # A tie goes to the answer stated first (by the lowest sample index); a path without an answer
  # never votes, so a leading None does not decide it.
  kept, majority = rest.select_majority([None, "3", "9", "9", "3"], 5, 0.0)
  assert kept.tolist() == [1, 4] and majority == ["3"]
  kept, majority = rest.select_majority(["7", "5", "5", "7"], 4, 0.0)
  assert kept.tolist() == [0, 3] and majority == ["7"]
  # Groups are prompts: indices are global, a group without any answer keeps nothing.
  kept, majority = rest.select_majority(["1", "2", "2", None, None, None], 3, 0.0)
  assert kept.tolist() == [1, 2] and majority == ["2", None]
  with pytest.raises(ValueError, match="groups of n=4"):
    rest.select_majority(["1"] * 6, 4, 0.0)


def test_min_agreement_counts_unparsed_paths_against_the_majority():
  answers = ["5", "5", None, None]  # 2 of 4 paths agree (all that voted, but half of the paths)
  assert rest.select_majority(answers, 4, 0.5)[0].tolist() == [0, 1]
  assert rest.select_majority(answers, 4, 0.75)[0].tolist() == []
  assert rest.select_majority(answers, 4, 0.75)[1] == [None]
  three_of_five = ["4", "4", "4", "1", "2"]  # 3 / 5 = 0.6 exactly: kept at 0.6, not above
  assert rest.select_majority(three_of_five, 5, 0.6)[0].tolist() == [0, 1, 2]
  assert rest.select_majority(three_of_five, 5, 0.61)[0].tolist() == []
  assert rest.select_majority(["8"] * 4, 4, 1.0)[0].tolist() == [0, 1, 2, 3]


def test_restart_steps_follow_the_paper_s_schedule():
  # 40 steps, then 20% more per outer iteration: 40 * 1.2^k rounded half up.
  assert [rest.restart_steps(k, 40, 0.2) for k in range(6)] == [40, 48, 58, 69, 83, 100]
  assert [rest.restart_steps(k, 2, 0.5) for k in range(4)] == [2, 3, 5, 7]  # 2, 3, 4.5, 6.75
  assert [rest.restart_steps(k, 7, 0.0) for k in range(3)] == [7, 7, 7]


class _Tokenizer:
  bos_id, eos_id, vocab_size = 1, 2, 100

  def encode(self, text):
    return [ord(ch) % 90 + 5 for ch in text]


def _scripted_sampler(script):
  """Stands in for online.Sampler: sample i of a prompt at an iteration is script(problem, prompt, i);
  its completion ids are [a, b, iteration, i], so a test can tell the rows apart."""

  class Sampler:
    def __init__(self, policy, tokenizer, config, rules=None, meter=None):
      del policy, tokenizer, rules, meter
      self.config = config

    def __call__(self, prompts, iteration, *, n=None, temperature=None):
      n = self.config.rl.samples_per_prompt if n is None else n
      texts, ids = [], []
      for prompt in prompts:
        problem = arithmetic.parse_prompt(prompt)
        for i in range(n):
          texts.append(script(problem, prompt, i))
          ids.append([problem.a, problem.b, iteration % 1_000_000, i])
      return rollout.Samples([[1, 7, 7]] * len(texts), ids, np.ones(len(texts), bool), texts)

  return Sampler


def _raising(problem, completion):
  raise AssertionError("self_consistency called a reward")


def _rest_config(mode, **overrides):
  c = align_config("rest")
  c.task.name, c.task.difficulty, c.task.train_size = "arithmetic", 1, 8
  c.batch_size, c.seq_len = 4, 48  # room for a rationalization: the plain prompt, encoded
  c.rest.mode = mode
  c.rl.prompts_per_iteration = 2
  c.optimizer.schedule, c.optimizer.warmup_steps = "constant", 0
  c.update_from_flattened_dict(overrides)
  return c


def _source(tmp_path, config, task):
  context = trainer.DataContext(workdir=tmp_path, mesh=None, rules=None, live=lambda: None)
  return rest.make_dataset(config, _Tokenizer(), split="train", context=context, task=task)


def test_self_consistency_trains_on_majority_paths_without_any_reward(tmp_path, monkeypatch, caplog):
  """The whole collect, with a task whose every reward raises and a reward model that does not
  exist: the kept rows are the majority's paths, and the gold answers only feed the diagnostic."""
  config = _rest_config("self_consistency", **{"rl.samples_per_prompt": 4, "rl.reward": "model",
                                               "rest.improve_steps": 3})
  task = tasks.get_task(config.task)
  task = dataclasses.replace(task, rewards={name: _raising for name in task.rewards})
  rest.validate(config, task)  # rl.reward='model' without rl.reward_model: nothing reads it

  def script(problem, prompt, i):  # paths 0 and 1 agree (on a wrong answer for odd a); path 2 states none
    stated = problem.answer + problem.a % 2
    return [f" x\nAnswer: {stated}", f" y\nAnswer: {stated}", " no answer", f" z\nAnswer: {stated + 5}"][i]

  monkeypatch.setattr(online, "Sampler", _scripted_sampler(script))
  caplog.set_level(logging.INFO)
  batch = next(iter(_source(tmp_path, config, task)))
  experience, _ = rollout.load_experience(rollout.experience_path(tmp_path, 0))
  problems = [arithmetic.parse_prompt(p)
              for p in online.prompt_batch(online.prompts(config, task), 0, 2, seed=config.seed)]
  # Rows are prompt [1, 7, 7] then completion [a, b, iteration, i]: paths 0 and 1 of each prompt.
  kept = experience.rows["targets"][:, 2:6]
  assert sorted(kept.tolist()) == sorted([p.a, p.b, 0, i] for p in problems for i in (0, 1))
  assert experience.schedule.shape == (3, 4) and not experience.restart and trainer.RESTART not in batch
  summary = next(r.args[2] for r in caplog.records if r.msg == "%s grow %d: %s")
  right = np.mean([p.a % 2 == 0 for p in problems])
  assert summary["kept"] == 4 and summary["unparsed"] == 2 and summary["kept_right"] == pytest.approx(right)


def test_self_consistency_needs_no_task_only_prompts(tmp_path, monkeypatch, caplog):
  """Without a task (prompts from rl.prompts_path), answers.extract reads the answers and nothing
  can tell which are right: no kept_right."""
  problems = arithmetic.problems(3, difficulty=1, seed=0)
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in problems))
  config = _rest_config("self_consistency", **{"task.name": "", "rl.prompts_path": str(path),
                                               "rl.samples_per_prompt": 3, "rl.prompts_per_iteration": 3})
  rest.validate(config, None)  # rl.reward='exact' names no verifier here, and is never read

  def script(problem, prompt, i):  # GSM8K's '#### N' and a last number count as answers too
    return [f" so #### {problem.a}", f" it is {problem.a}", " none"][i]

  monkeypatch.setattr(online, "Sampler", _scripted_sampler(script))
  caplog.set_level(logging.INFO)
  next(iter(_source(tmp_path, config, None)))
  experience, _ = rollout.load_experience(rollout.experience_path(tmp_path, 0))
  assert sorted(experience.rows["targets"][:, 2:6].tolist()) == sorted([p.a, p.b, 0, i] for p in problems for i in (0, 1))
  summary = next(r.args[2] for r in caplog.records if r.msg == "%s grow %d: %s")
  assert summary == {"kept": 6, "prompts_kept": 3, "unparsed": 3}


def _star_source(tmp_path, monkeypatch, config):
  def script(problem, prompt, i):  # right for even a, and always when given the answer as a hint
    right = problem.a % 2 == 0 or "Hint" in prompt
    return f" ...\nAnswer: {problem.answer if right else problem.answer + 1}"

  monkeypatch.setattr(online, "Sampler", _scripted_sampler(script))
  task = tasks.get_task(config.task)
  rest.validate(config, task)
  return _source(tmp_path, config, task)


def test_star_restart_grows_the_set_and_asks_one_restart_per_outer_iteration(tmp_path, monkeypatch):
  config = _rest_config("star", **{"rest.star_restart": True, "rest.restart_steps": 2, "rest.restart_growth": 0.5,
                                   "total_steps": 10})
  it = iter(_star_source(tmp_path, monkeypatch, config))
  batches = [next(it) for _ in range(5)]  # outer iterations of 2, 3 and 5 steps
  at_boundary = json.loads(json.dumps(it.get_state()))  # a checkpoint at the end of outer iteration 1
  batches += [next(it) for _ in range(5)]
  assert [trainer.RESTART in b for b in batches] == [False, False, True, False, False, True, False, False, False, False]
  sizes = []
  for k, steps in enumerate((2, 3, 5)):
    experience, _ = rollout.load_experience(rollout.experience_path(tmp_path, k))
    assert experience.schedule.shape == (steps, 4) and experience.restart == (k > 0)
    sizes.append(len(experience.rows["tokens"]))
    if k:  # every rationale kept so far: the previous set, then this iteration's
      previous, _ = rollout.load_experience(rollout.experience_path(tmp_path, k - 1))
      for key, rows in previous.rows.items():
        np.testing.assert_array_equal(experience.rows[key][: len(rows)], rows)
  assert sizes == [2, 4, 6]  # each prompt kept once per iteration (a plain rationale or a rationalization)

  # Resumed at that checkpoint, a new source builds iteration 2's set from iteration 1's saved one.
  straight, _ = rollout.load_experience(rollout.experience_path(tmp_path, 2))
  rollout.experience_path(tmp_path, 2).unlink()
  again = iter(_star_source(tmp_path, monkeypatch, config))
  again.set_state(at_boundary)
  assert trainer.RESTART in next(again)
  resumed, _ = rollout.load_experience(rollout.experience_path(tmp_path, 2))
  for key in straight.rows:
    np.testing.assert_array_equal(resumed.rows[key], straight.rows[key])
  np.testing.assert_array_equal(resumed.schedule, straight.schedule)


@pytest.mark.parametrize("overrides, message", [
    ({"rest.min_agreement": 1.5}, "config.rest.min_agreement=1.5 is out of [0, 1]"),
    ({"rest.mode": "self_consistency", "rl.samples_per_prompt": 1}, "config.rl.samples_per_prompt=1"),
    ({"rest.star_restart": True}, "config.rest.star_restart is STaR's"),
    ({"rest.mode": "star", "rest.star_restart": True, "optimizer.warmup_steps": 5}, "config.optimizer.schedule='constant' with warmup_steps=5"),
    ({"rest.mode": "star", "rest.star_restart": True, "optimizer.schedule": "warmup_cosine"}, "config.optimizer.schedule='warmup_cosine'"),
    ({"rest.restart_steps": 0}, "config.rest.restart_steps=0"),
    ({"rest.restart_growth": -0.1}, "config.rest.restart_growth=-0.1"),
])
def test_bad_settings_name_the_key(overrides, message):
  config = _rest_config("rest", **{"optimizer.schedule": "constant", **overrides})
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(".", r"\.")):
    rest.validate(config, tasks.get_task(config.task))


@pytest.mark.parametrize("arg", ["mode=star,restart=1,steps=146", "mode=self_consistency,samples=8,agree=0.5"])
def test_the_documented_variants_validate(arg):
  from align import run as align_run

  config = rest_arithmetic.get_config(arg)
  align_run.validate(config)
  assert config.rest.star_restart == ("restart=1" in arg)
