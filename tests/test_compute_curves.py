"""Test-time compute curves (align/compute_curves.py) against independent references: hand-counted
pass@N, best-of-N and majority votes on fixed tables, the nesting of N, FLOPs against a per-token
loop, a scripted sampler whose answers are read back, and the entry point on a tiny random run."""

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import infer
import model as model_lib
from align import compute_curves
from align import run as align_run
from align.tasks import arithmetic, get_task
from configs import cli, common, validation
from configs.align import compute_curves as curves_config
from configs.align.common import align_config, task_config
import rundir
from rundir import tokenizer as tokenizer_lib
from tests.scripted_model import ScriptedModel

ROOT = Path(__file__).resolve().parent.parent

# 3 problems x 4 samples: which are right, the answers they gave, and a ranker's scores.
CORRECT = np.array([[0, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
ANSWERS = [["3", "3", "7", "5"], ["9", "9", "2", "2"], [None, "4", None, "1"]]
GOLD = ["7", "9", "6"]
SCORES = np.array([[0.1, 0.5, 0.4, 0.9], [0.2, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])
NS = (1, 2, 4)


def test_pass_at_n_and_best_of_n_by_hand():
  # pass@1: only problem 1's first sample is right; @2 the same; @4 problem 0's third is too.
  np.testing.assert_allclose(compute_curves.pass_at_n(CORRECT, NS), [1 / 3, 1 / 3, 2 / 3])
  # An oracle ranker (the verifier's own 0/1 scores) is pass@N.
  np.testing.assert_allclose(compute_curves.best_of_n(CORRECT, CORRECT.astype(float), NS),
                             compute_curves.pass_at_n(CORRECT, NS))
  # The scores pick, per N: problem 0 -> samples 0, 1, 3 (wrong each time); problem 1 -> 0, 0
  # (the first of the tied 0.2s), 2 (wrong); problem 2 -> 0 (ties: the first).
  np.testing.assert_allclose(compute_curves.best_of_n(CORRECT, SCORES, NS), [1 / 3, 1 / 3, 0.0])


def test_unbiased_pass_at_n_is_chen_et_al():
  rng = np.random.default_rng(0)
  correct = rng.random((5, 16)) < 0.2
  ns = (1, 3, 8, 16)
  want = [np.mean([1 - math.comb(16 - c, n) / math.comb(16, n) for c in correct.sum(1)]) for n in ns]
  np.testing.assert_allclose(compute_curves.pass_at_n_unbiased(correct, ns), want, rtol=1e-12)
  np.testing.assert_allclose(compute_curves.pass_at_n_unbiased(correct, (1,)), [correct.mean()])


def _majority(answers):
  """An independent vote: the answer with most votes, the earliest first appearance among ties."""
  counts, first = collections.Counter(), {}
  for i, a in enumerate(answers):
    if a is not None:
      counts[a] += 1
      first.setdefault(a, i)
  return min(counts, key=lambda a: (-counts[a], first[a])) if counts else None


def test_self_consistency_by_hand():
  # N=1: "3" (wrong), "9" (right), None; N=2: "3", "9" ("9" x2), "4"; N=4: 3-3 vs 7, 5 -> "3";
  # "9" and "2" tie 2-2 -> "9" (first seen); "4" and "1" tie -> "4".
  np.testing.assert_allclose(compute_curves.self_consistency(ANSWERS, GOLD, NS), [1 / 3, 1 / 3, 1 / 3])
  assert [_majority(row) for row in ANSWERS] == ["3", "9", "4"]


def test_curves_read_only_the_first_n_samples():
  """Nested prefixes: changing samples past N changes nothing at N."""
  changed_correct, changed_scores = CORRECT.copy(), SCORES.copy()
  changed_correct[:, 2:], changed_scores[:, 2:] = True, 10.0
  changed_answers = [row[:2] + [g, g] for row, g in zip(ANSWERS, GOLD)]
  # At N=4 the vote of problem 0 is a 2-2 tie, which its first seen answer ("3") wins.
  for before, after, at_4 in [
      (compute_curves.pass_at_n(CORRECT, NS), compute_curves.pass_at_n(changed_correct, NS), 1.0),
      (compute_curves.best_of_n(CORRECT, SCORES, NS), compute_curves.best_of_n(changed_correct, changed_scores, NS),
       1.0),
      (compute_curves.self_consistency(ANSWERS, GOLD, NS), compute_curves.self_consistency(changed_answers, GOLD, NS),
       2 / 3),
  ]:
    np.testing.assert_array_equal(before[:2], after[:2])
    assert after[2] == pytest.approx(at_4)
  flops = np.arange(12.0).reshape(3, 4)
  np.testing.assert_allclose(compute_curves.nested_flops(flops, NS), [4.0, 4.0 + 5.0, (6 + 22 + 38) / 3])


def _forward_flops_loop(c: model_lib.ModelConfig, n: int) -> float:
  """Token by token: every matmul weight twice (multiply and add), and token t's q.k and p.v over t keys."""
  d, h = c.embed_dim, c.head_dim
  weights = c.num_layers * (d * h * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * d * c.mlp_dim) + c.vocab_size * d
  return sum(2.0 * weights + c.num_layers * c.num_heads * (2 * h * t + 2 * h * t) for t in range(1, n + 1))


@pytest.mark.parametrize("preset", ["tiny", "llama3.2-1b", "gemma-2b"])
def test_forward_flops_match_a_per_token_count(preset):
  c = model_lib.get_preset(preset)
  for n in (1, 7, 300):
    assert model_lib.forward_flops(c, n) == pytest.approx(_forward_flops_loop(c, n), rel=1e-12)
  # Forward matmuls are a third of training's (flops_per_token: forward and backward).
  attention = 12.0 * c.num_layers * c.num_heads * c.head_dim * 64
  assert model_lib.flops_per_token(c, 64) - attention == pytest.approx(6.0 * model_lib.matmul_param_count(c))
  np.testing.assert_allclose(model_lib.forward_flops(c, np.array([1, 7])),
                             [_forward_flops_loop(c, 1), _forward_flops_loop(c, 7)])


def test_a_forced_completion_is_scored_on_its_first_answer_line():
  problem = arithmetic.Problem(9, 5, "+")
  forced = "  9 + 5 = 14, write 4 carry 1.\nAnswer: 14, write 4\nAnswer: 3"
  assert compute_curves.first_answer_line(forced) == "  9 + 5 = 14, write 4 carry 1.\nAnswer: 14, write 4"
  assert arithmetic.reward(compute_curves.first_answer_line(forced), problem) == 1.0
  assert arithmetic.reward(forced, problem) == 0.0  # the task's own reading takes the last answer line
  for unchanged in ("  9 + 5 = 14\nAnswer: 14", "  9 + 5 = 14. Wait"):
    assert compute_curves.first_answer_line(unchanged) == unchanged


# ---------------------------------------------------------------- a scripted sampler
class _Pieces:
  """A tokenizer with one piece per id; a prompt, whatever it says, is the one token QUESTION."""

  bos_id, eos_id = 0, 1
  QUESTION, ANSWER_LINE = 2, 3
  pieces = ["", "", "?", "\nAnswer: ", *[str(k) for k in range(19)]]
  vocab_size = len(pieces)

  def encode(self, text):
    del text
    return [self.QUESTION]

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids)


def _number(k):
  return 4 + k


def test_scripted_samples_are_scored_and_priced_exactly():
  """After the question the model writes the answer line, then 14 (p .4), 9 (p .3) or 5 (p .3), then
  stops: the answers read back give the curves, and every sample costs forward_flops(2 + 3)."""
  tok = _Pieces()
  policy = ScriptedModel({tok.QUESTION: tok.ANSWER_LINE, tok.ANSWER_LINE: {_number(14): 0.4, _number(9): 0.3,
                                                                            _number(5): 0.3},
                          **{_number(k): tok.eos_id for k in range(19)}}, tok.vocab_size)
  policy.config = model_lib.get_preset("tiny", vocab_size=tok.vocab_size)  # what its FLOPs are priced as
  task = get_task({**task_config().to_dict(), "name": "arithmetic", "difficulty": 1})
  problems = [p for p in task.split("eval", 60, 0) if p.answer in ("14", "9", "5")][:6]
  assert len({p.answer for p in problems}) > 1
  m, ns = 16, (1, 2, 4, 8, 16)
  drawn = compute_curves.draw(policy, tok, problems, samples=m, sampling=infer.Sampling(temperature=1.0),
                              max_new_tokens=4, seed=3, rows_per_call=32)
  scored = compute_curves.score(drawn, problems, task, policy.config)
  assert all(a in ("14", "9", "5") for row in scored.answers for a in row)
  assert len({a for row in scored.answers for a in row}) == 3  # it did sample
  right = [[a == p.answer for a in row] for p, row in zip(problems, scored.answers)]
  np.testing.assert_array_equal(scored.correct, right)
  want_pass = [np.mean([any(row[:n]) for row in right]) for n in ns]
  np.testing.assert_allclose(compute_curves.best_of_n(scored.correct, scored.correct.astype(float), ns), want_pass)
  want_vote = [np.mean([_majority(row[:n]) == p.answer for row, p in zip(scored.answers, problems)]) for n in ns]
  np.testing.assert_allclose(compute_curves.self_consistency(scored.answers, [p.answer for p in problems], ns),
                             want_vote)
  np.testing.assert_array_equal(scored.completion_tokens, 3)  # the answer line, the number, eos
  per_sample = _forward_flops_loop(policy.config, 2 + 3)  # bos and the question, then 3 generated
  np.testing.assert_allclose(scored.flops, per_sample)
  np.testing.assert_allclose(compute_curves.nested_flops(scored.flops, ns), [n * per_sample for n in ns])


# ---------------------------------------------------------------- config checks and the entry point
@pytest.mark.parametrize("key, value, message", [
    ("ns", (4, 2), "config.ns"), ("ns", (0, 1), "config.ns"), ("budgets", (-1,), "config.budgets"),
    ("temperature", 0.0, "config.temperature"), ("problems", 0, "config.problems"),
    ("verifier", "nope", "config.verifier"), ("budget_continuation", "", "config.budget_continuation"),
    ("budget_modes", ("most",), "config.budget_modes"),
])
def test_bad_values_are_named(key, value, message):
  config = curves_config.get_config()
  config[key] = value
  with pytest.raises(validation.ConfigError, match=message):
    compute_curves.validate(config)


def test_bad_paths_are_named(tmp_path):
  config = curves_config.get_config()
  with pytest.raises(validation.ConfigError, match="config.policy is empty"):
    compute_curves.check_paths(config)
  config.policy = str(tmp_path)
  with pytest.raises(validation.ConfigError, match="config.policy="):
    compute_curves.check_paths(config)


def test_the_command_line_names_a_missing_policy_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-m", "align.compute_curves", "--config=configs/align/compute_curves.py",
                         f"--config.policy={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == cli.EXIT_STATUS, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"error: config.policy={str(tmp_path / 'nope')!r} is not a training run's workdir (with checkpoints/); it does "
      "not exist"]


VOCAB = 320


def _run_config(method, tokenizer_path, workdir_init="", **overrides):
  c = align_config(method)
  c.total_steps, c.batch_size, c.seq_len, c.log_every, c.eval_every, c.checkpoint_every = 4, 8, 64, 4, 0, 2
  c.model = common.model_config("tiny", num_layers=1, vocab_size=VOCAB, embed_dim=32, num_heads=2, num_kv_heads=1,
                                head_dim=16, mlp_dim=64)
  c.tokenizer.path = str(tokenizer_path)
  c.task.name, c.task.difficulty, c.task.train_size, c.task.eval_size = "arithmetic", 1, 64, 8
  c.init_from = workdir_init
  c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 3e-3, 1, "constant"
  c.mesh.data = 8
  c.update_from_flattened_dict(overrides)
  return c


def test_the_entry_point_writes_the_plot_and_the_numbers(tmp_path, monkeypatch):
  """A tiny random SFT run (checkpoints at steps 2 and 4) and a reward model on it: every curve is
  written, with FLOPs that follow from the lengths the JSON reports."""
  texts = [r["prompt"] + r["completion"] for r in arithmetic.sft_examples(200, difficulty=1, seed=9)]
  tokenizer_path = tmp_path / "tokenizer.model"
  tokenizer_lib.train_tokenizer(texts, tokenizer_path, vocab_size=VOCAB)
  align_run.run(_run_config("sft", tokenizer_path), tmp_path / "sft")
  align_run.run(_run_config("reward", tokenizer_path, str(tmp_path / "sft"), total_steps=2), tmp_path / "rm")

  config = curves_config.get_config("difficulty=1,problems=3,samples=4")
  config.policy, config.reward_model = str(tmp_path / "sft"), str(tmp_path / "rm")
  config.max_new_tokens, config.budgets, config.budget_answer_tokens, config.reward_seq_len = 12, (0, 3), 4, 48
  result = compute_curves.run(config, tmp_path / "out")

  assert (tmp_path / "out" / compute_curves.PLOT_FILE).stat().st_size > 10_000
  saved = json.loads((tmp_path / "out" / compute_curves.JSON_FILE).read_text())
  assert saved["curves"].keys() == {"verifier", "self_consistency", "reward_model", "budget_maximum", "budget_exact",
                                    "train_time"}
  assert saved["skipped"] == {}
  for name in ("verifier", "self_consistency", "reward_model"):
    assert [p["n"] for p in saved["curves"][name]["points"]] == [1, 2, 4]
  flops = [p["inference_flops"] for p in saved["curves"]["verifier"]["points"]]
  assert flops[0] < flops[1] < flops[2]
  rm_flops = [p["inference_flops"] for p in saved["curves"]["reward_model"]["points"]]
  assert all(r > f for r, f in zip(rm_flops, flops))  # the reward model's reading is added
  for mode in ("maximum", "exact"):
    budget = saved["curves"][f"budget_{mode}"]
    assert budget["end_of_thinking"].strip() == "Answer:" and [p["budget"] for p in budget["points"]] == [0, 3]
    assert budget["points"][0]["thinking_tokens"] == 0  # budget 0: the answer line is forced at once
    assert budget["points"][1]["thinking_tokens"] <= 3 + 3  # at most the budget and a continuation begun at it
  assert saved["curves"]["budget_exact"]["continuation"] == " Wait"
  train = saved["curves"]["train_time"]["points"]
  assert [p["step"] for p in train] == [2, 4]  # no init_from: a random start has no point
  policy_config = rundir.load(tmp_path / "sft")[0].config
  assert train[1]["training_flops"] == pytest.approx(4 * 8 * 64 * model_lib.flops_per_token(policy_config, 64))
  assert saved["policy"]["training_flops"] == train[1]["training_flops"]
  rm_training = 2 * 2 * 8 * 64 * model_lib.flops_per_token(policy_config, 64)  # 2 steps of 8 pairs of 2 rows
  assert saved["curves"]["reward_model"]["points"][0]["training_flops"] == pytest.approx(
      train[1]["training_flops"] + rm_training)
  assert result["curves"]["verifier"]["points"][-1]["accuracy"] >= result["curves"]["verifier"]["points"][0]["accuracy"]

  # A second run of the same draw reuses the kept samples and reward-model scores (here without budgets).
  draw = compute_curves.draw

  def greedy_only(*args, samples, **kwargs):
    assert samples == 1, "the samples were drawn again"  # the train-time curve's greedy answers are drawn
    return draw(*args, samples=samples, **kwargs)

  def no_scoring(*args, **kwargs):
    raise AssertionError("the reward model scored the samples again")

  monkeypatch.setattr(compute_curves, "draw", greedy_only)
  monkeypatch.setattr(compute_curves, "reward_model_scores", no_scoring)
  config.budgets = ()
  again = compute_curves.run(config, tmp_path / "out")
  for name in ("verifier", "self_consistency", "reward_model"):
    assert again["curves"][name] == saved["curves"][name]
  assert again["skipped"] == {"budget_forcing": "config.budgets or budget_modes is empty"}
