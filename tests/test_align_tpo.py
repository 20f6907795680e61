"""TPO: response parsing, judging and pair selection on hand-built cases; its trainer loss is
dpo_loss on its pairs; a tiny run through the shared trainer on 8 fake devices (the DPO tests'
tiny model and tokenizer) in which every iteration's DPO reference is the policy that sampled it."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from align import losses, rollout, tpo
from align import run as align_run
from configs import validation
from tests import test_align_dpo

# A random tiny model writes the letter n in about a third of its 16-token samples: the marker
# parses some samples and not others, so prompts have a best (parsed) and a worst (not) sample.
TINY = {"eval_every": 0, "task.train_size": 8, "rl.prompts_per_iteration": 8, "rl.samples_per_prompt": 4,
        "rl.max_new_tokens": 16, "tpo.template": "{prompt} Think, then answer.", "tpo.marker": "n"}

_config = test_align_dpo._config  # the DPO tests' tiny run: same model, tokenizer and mesh
tokenizer_path = test_align_dpo.tokenizer_path  # a module fixture: the tokenizer those tests train


def test_parse_response_is_the_text_after_the_first_marker():
  marker = "Here is my response:"
  assert tpo.parse_response("Here is my thought process: add. Here is my response: 4", marker) == " 4"
  assert tpo.parse_response(f"a{marker}b{marker}c", marker) == f"b{marker}c"
  assert tpo.parse_response(f"all thought{marker}", marker) == ""  # parsed, and empty
  assert tpo.parse_response("all thought, no response", marker) is None
  assert tpo.parse_response(" 3 + 4 = 7\nAnswer: 7", "\n") == "Answer: 7"


def test_the_judge_sees_responses_only_and_unparsed_samples_score_lowest():
  seen = []

  def reward_fn(prompts, responses):
    seen.append((list(prompts), list(responses)))
    return np.asarray([len(r) - 10.0 for r in responses])

  scores = tpo.judge_scores(["p", "p", "q"], ["abc", None, ""], reward_fn)
  assert seen == [(["p", "q"], ["abc", ""])]
  np.testing.assert_array_equal(scores, [-7.0, -np.inf, -10.0])  # below any score the judge gives


def test_pairs_are_best_versus_worst_and_ties_give_none():
  scores = np.asarray([
      [0.0, 1.0, 0.5, 1.0],  # best: the first of the tied 1s; worst: 0
      [0.3, 0.3, 0.3, 0.3],  # all tie: no pair
      [-np.inf, 0.0, -np.inf, 0.0],  # all parsed ones tie, but unparsed ones are worse
      [-np.inf, -np.inf, -np.inf, -np.inf],  # none parsed: a tie
      [0.2, 0.9, 0.1, 0.4],
  ])
  np.testing.assert_array_equal(tpo.select_pairs(scores), [[0, 1, 0], [2, 1, 0], [4, 1, 2]])
  assert tpo.select_pairs(np.zeros((3, 2))).shape == (0, 3)


def test_length_control_ranks_by_standardised_score_less_rho_standardised_length():
  scores = np.asarray([[1.0, 1.0, 0.0, -np.inf],  # judged alike, 1 and 1; the length decides between them
                       [0.5, 0.5, 0.5, 0.5]])  # a tie on score: shortest best, longest worst
  lengths = np.asarray([[10, 30, 5, 99], [4, 2, 8, 6]])
  got = tpo.length_controlled(scores, lengths, 0.5)
  for row in range(2):  # the closed form over the parsed samples (population std), in float64
    parsed = np.isfinite(scores[row])
    s, n = scores[row][parsed], lengths[row][parsed].astype(np.float64)
    z_s = (s - s.mean()) / s.std() if s.std() else np.zeros_like(s)
    np.testing.assert_allclose(got[row][parsed], z_s - 0.5 * (n - n.mean()) / n.std(), rtol=1e-12)
  assert got[0, 3] == -np.inf
  np.testing.assert_array_equal(tpo.select_pairs(got), [[0, 0, 3], [1, 1, 2]])  # the unparsed one stays worst
  assert tpo.length_controlled(scores, lengths, 0.0) is scores  # off: the judge's scores
  np.testing.assert_array_equal(tpo.select_pairs(scores), [[0, 0, 3]])  # off, the tie gives no pair


def test_held_out_scores_read_the_response_alone(monkeypatch):
  """align/run.py's scores go through Method.response_of: for TPO the text after the marker, so an
  answer written only in the thought, or with no marker, is wrong."""
  import types

  import infer
  from align import evaluation, registry, tasks
  from align.tasks import arithmetic
  from configs.align import tpo as tpo_config

  class Chars:  # one token per character; 1 and 2 are bos and eos
    bos_id, eos_id, vocab_size = 1, 2, 128

    def encode(self, text):
      return [ord(ch) for ch in text]

    def decode(self, ids):
      return "".join(chr(i) for i in ids if i > 2)

  task = tasks.get_task({"name": "arithmetic", "difficulty": 2})
  problems = [arithmetic._task_problem(p, 0) for p in
              (arithmetic.Problem(12, 30, "+"), arithmetic.Problem(45, 3, "+"), arithmetic.Problem(9, 1, "-"))]
  marker = tpo_config.get_config().tpo.marker
  completions = [f" Here is my thought process: Answer: 42\n{marker} I do not know.",  # right in the thought only
                 f" Here is my thought process: add.\n{marker}\nAnswer: 48",  # right in the response
                 " Answer: 8"]  # right, but no marker: no response
  monkeypatch.setattr(infer, "generate", lambda model, prompts, **kwargs: types.SimpleNamespace(
      tokens=[[*Chars().encode(c), 2] for c in completions]))
  assert evaluation.task_scores(None, Chars(), problems, task)["exact"] == pytest.approx(1.0)  # the whole text
  config = tpo_config.get_config()
  response_of = registry.get_method("tpo").response_of(config)
  assert response_of(completions[1]) == "\nAnswer: 48" and response_of(completions[2]) == ""
  scores = evaluation.task_scores(None, Chars(), problems, task, response_of=response_of)
  assert scores["exact"] == pytest.approx(1 / 3)


def _logps(model, tokens, targets, mask):
  logits = np.asarray(model(tokens), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
  return (picked * mask).sum(-1)


def test_tpo_loss_is_dpo_loss_on_its_pairs(tokenizer_path, tmp_path):
  config = _config(tokenizer_path, "tpo", total_steps=1, **TINY)
  run, _, _ = align_run.setup(config, tmp_path)
  local = next(run.train_iter)
  model = run.model()
  chosen, rejected = (_logps(model, local[f"{s}_tokens"], local[f"{s}_targets"], local[f"{s}_mask"])
                      for s in ("chosen", "rejected"))
  # The reference of the first iteration is the starting policy: the one being trained, at step 0.
  np.testing.assert_allclose(local["reference_chosen_logps"], chosen, rtol=1e-4)
  np.testing.assert_allclose(local["reference_rejected_logps"], rejected, rtol=1e-4)
  shifted = dict(local, reference_chosen_logps=local["reference_chosen_logps"] + np.linspace(-3, 3, 8, dtype=np.float32))
  loss, metrics = run.loss_fn(model, {k: jnp.asarray(v) for k, v in shifted.items()}, None)
  expected, _ = losses.dpo_loss(chosen, rejected, shifted["reference_chosen_logps"], local["reference_rejected_logps"],
                                beta=config.tpo.beta)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["logps/chosen"]), chosen.mean(), rtol=1e-4)


def test_tpo_iterates_with_the_sampling_policy_as_the_reference(tokenizer_path, tmp_path):
  config = _config(tokenizer_path, "tpo", total_steps=6, log_every=1, **{**TINY, "rl.epochs": 3})
  result = align_run.run(config, tmp_path)
  assert result["step"] == 6
  logged = {m["step"]: m["loss"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}
  starts, step = [], 1  # the step at which each iteration's pairs begin
  while (tmp_path / rollout.ROLLOUT_DIR / f"{len(starts)}.npz").exists():
    experience, _ = rollout.load_experience(tmp_path / rollout.ROLLOUT_DIR / f"{len(starts)}.npz")
    starts.append(step)
    step += len(experience.schedule)
  assert len(starts) >= 2 and starts[1] <= 6, starts
  within = [s for s in range(1, 7) if s not in starts]
  assert within and all(logged[s] < math.log(2) - 1e-3 for s in within), logged  # DPO learns each iteration's pairs
  for s in starts:  # ... and each iteration starts again at ln 2: its reference is the policy that sampled it
    assert logged[s] == pytest.approx(math.log(2), abs=1e-5), (s, logged)


@pytest.mark.parametrize("overrides, message", [
    ({"tpo.template": "no slot"}, "config.tpo.template='no slot'"),
    ({"tpo.marker": ""}, "config.tpo.marker=''"),
    ({"tpo.beta": 0.0}, "config.tpo.beta=0.0"),
    ({"tpo.length_penalty": -1.0}, "config.tpo.length_penalty=-1.0"),
    ({"tpo.loss_type": "simpo"}, "config.tpo.loss_type='simpo'"),
    ({"rl.samples_per_prompt": 1}, "config.rl.samples_per_prompt=1"),
])
def test_bad_tpo_configs_name_the_key(tokenizer_path, overrides, message):
  with pytest.raises(validation.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    align_run.validate(_config(tokenizer_path, "tpo", **{**TINY, **overrides}))
