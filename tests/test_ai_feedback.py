"""AI feedback: sampled completions ranked by a judge become (best, worst) pairs; judges that cannot
tell samples apart give no pair; the log-prob judge cancels position bias."""

import numpy as np
import pytest
from flax import nnx

from align import ai_feedback, data, preferences, rollout
from align.tasks import arithmetic
from model import Transformer, get_preset
from rundir import tokenizer as tokenizer_lib

VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [r["prompt"] + r["completion"] for r in arithmetic.sft_examples(300, difficulty=2, seed=9)]
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  # The judge's answer words as whole pieces (user-defined symbols), as a real judge's vocabulary has them.
  return tokenizer_lib.train_tokenizer(texts, path, vocab_size=VOCAB, special_tokens=("▁A", "▁B"))


@pytest.fixture(scope="module")
def policy():
  return Transformer(get_preset("tiny").replace(vocab_size=VOCAB, dtype="float32", param_dtype="float32"),
                     rngs=nnx.Rngs(0))


def test_pairs_are_the_best_and_worst_samples(tokenizer, policy):
  prompts = [p.prompt for p in arithmetic.problems(3, difficulty=2, seed=1)]
  seen = {}

  def judge(prompt, completions):
    seen[prompt] = completions
    return [len(c) for c in completions]

  pairs = ai_feedback.preference_pairs(policy, tokenizer, prompts, judge=judge, n=4, max_new_tokens=12, rng=0)
  assert pairs and {p["prompt"] for p in pairs} <= set(prompts)
  for pair in pairs:
    lengths = [len(c) for c in seen[pair["prompt"]]]
    assert len(pair["chosen"]) == max(lengths) and len(pair["rejected"]) == min(lengths)
    assert pair["margin"] == max(lengths) - min(lengths) > 0
  assert ai_feedback.preference_pairs(policy, tokenizer, prompts, judge=lambda p, c: [1.0] * len(c), n=3,
                                      max_new_tokens=4) == []
  with pytest.raises(ValueError, match="n=1"):
    ai_feedback.preference_pairs(policy, tokenizer, prompts, judge=judge, n=1)


def test_log_prob_judge_cancels_position_bias(tokenizer):
  (a_id,), (b_id,) = tokenizer.encode("A"), tokenizer.encode("B")

  def biased_model(tokens):  # always prefers whatever is shown first, by log-odds 2
    logits = np.zeros((1, tokens.shape[1], VOCAB), np.float32)
    logits[0, -1, a_id] = 2.0
    return logits

  judge = ai_feedback.log_prob_judge(biased_model, tokenizer)
  np.testing.assert_allclose(judge("q", ["x", "y", "z"]), [0.0, 0.0, 0.0], atol=1e-9)

  def prefers_seven(tokens):  # prefers the answer holding the digit 7, whichever side it is on
    text = tokenizer.decode([int(t) for t in tokens[0]])
    first = text.split("Answer A:")[1].split("Answer B:")[0]
    logits = np.zeros((1, tokens.shape[1], VOCAB), np.float32)
    logits[0, -1, a_id if "7" in first else b_id] = 1.0
    return logits

  scores = ai_feedback.log_prob_judge(prefers_seven, tokenizer)("q", ["12", "17", "30"])
  assert np.argmax(scores) == 1 and scores[1] == pytest.approx(4.0)


def _sampler_of(completions_by_prompt, tokenizer):
  """A stand-in for align.rollout.sample whose policy samples the given completions, as ids a
  policy trained on them samples: each completion tokenized as SFT data tokenizes it (on its own)."""
  def sample(model, tokenizer_, prompts, *, n, **unused):
    rows = [data.prompt_completion_ids({"prompt": p, "completion": c}, tokenizer)
            for p in prompts for c in completions_by_prompt[p][:n]]
    prompt_ids, completion_ids = [r[0] for r in rows], [r[1] for r in rows]
    texts = [rollout.completion_text(tokenizer, p, c) for p, c in rows]
    return rollout.Samples(prompt_ids, completion_ids, np.ones(len(rows), bool), texts)
  return sample


def test_pairs_train_on_the_ids_the_policy_sampled(tokenizer, monkeypatch):
  """A pair's texts, tokenized as DPO tokenizes them, are the ids the policy sampled. The text as it
  reads after the prompt would not be: it has one more leading space (sentencepiece), another first token."""
  records = arithmetic.preference_pairs(4, difficulty=2, seed=3)
  completions = {r["prompt"]: [r["chosen"], r["rejected"]] for r in records}
  monkeypatch.setattr(rollout, "sample", _sampler_of(completions, tokenizer))
  pairs = ai_feedback.preference_pairs(None, tokenizer, list(completions), judge=lambda p, c: [1.0, 0.0], n=2)
  assert len(pairs) == len(records)
  for pair in pairs:
    for side, want in zip(("chosen", "rejected"), completions[pair["prompt"]]):
      features = preferences.completion_features(pair["prompt"], pair[side], tokenizer, seq_len=512)
      sampled = data.prompt_completion_ids({"prompt": pair["prompt"], "completion": want}, tokenizer)[1]
      assert features["targets"][features["mask"] == 1].tolist() == sampled
