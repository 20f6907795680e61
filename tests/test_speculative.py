"""Speculative sampling: greedy output equals the target's greedy output, and sampled output follows
the target's distribution exactly (a chi-square test against probabilities computed from full
forward passes), with a good draft, a poor one and prompt lookup (n-gram proposals, checked
against a plain-Python reference)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import infer
from infer import prompt_lookup
from model import Transformer, get_preset

VOCAB = 6
# A small vocabulary and large weights: peaked, position-dependent next-token distributions.
TARGET_CONFIG = get_preset("tiny").replace(
    vocab_size=VOCAB, dtype="float32", param_dtype="float32", init_std=0.35, sliding_window=4,
)
PROMPTS = [[1, 2, 3], [4, 0, 5, 2, 2, 1, 3], [2]]


@pytest.fixture(scope="module")
def target():
  return Transformer(TARGET_CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def drafts(target):
  poor = Transformer(TARGET_CONFIG.replace(num_layers=1, sliding_window=0, init_std=0.5), rngs=nnx.Rngs(7))
  return {"poor": poor, "self": target, "lookup": infer.PromptLookup(max_ngram=2)}


def _reference_proposals(context, k, max_ngram, min_ngram):
  """Plain Python: the tokens after the latest earlier occurrence of the longest matching suffix
  n-gram, continued through the tokens proposed so far; the last token again if nothing matches."""
  start = len(context) - 1
  for n in range(max_ngram, min_ngram - 1, -1):
    if len(context) < n:
      continue
    earlier = [j for j in range(len(context) - n) if context[j:j + n] == context[-n:]]
    if earlier:
      start = earlier[-1] + n
      break
  extended = list(context)
  for i in range(k):
    extended.append(extended[start + i])
  return extended[len(context):]


def test_prompt_lookup_proposals_match_a_python_reference():
  rng = np.random.default_rng(0)
  k, length = 5, 40
  for max_ngram, min_ngram in ((3, 1), (2, 2), (1, 1)):
    lookup = infer.PromptLookup(max_ngram=max_ngram, min_ngram=min_ngram)
    # Few symbols and planted repeats: matches of every length, loops, and rows without any match.
    history = rng.integers(0, 4, (64, length)).astype(np.int32)
    history[::3, 10:20] = history[::3, 0:10]
    history[1::4, :12] = np.arange(12) % 3
    history[2::8, :] = np.arange(length)  # distinct tokens: no n-gram repeats
    positions = rng.integers(0, 30, 64).astype(np.int32)
    got = np.asarray(prompt_lookup.propose(jnp.asarray(history), jnp.asarray(positions), k, lookup))
    for row in range(64):
      context = history[row, :positions[row] + 1].tolist()
      assert got[row].tolist() == _reference_proposals(context, k, max_ngram, min_ngram), (row, context)


def test_prompt_lookup_options_are_checked():
  with pytest.raises(ValueError, match="min_ngram"):
    infer.PromptLookup(max_ngram=2, min_ngram=3)
  with pytest.raises(ValueError, match="max_ngram"):
    infer.PromptLookup(max_ngram=0)


@pytest.mark.parametrize("draft_name", ["poor", "self", "lookup"])
def test_greedy_speculative_equals_target_greedy(target, drafts, draft_name):
  plain = infer.generate(target, PROMPTS, max_new_tokens=11)
  out = infer.speculative_generate(target, drafts[draft_name], PROMPTS, max_new_tokens=11, num_draft_tokens=3)
  assert out.tokens == plain.tokens
  np.testing.assert_allclose(np.concatenate(out.model_logprobs), np.concatenate(plain.model_logprobs), atol=1e-5)
  if draft_name == "self":  # a draft that is the target is always right: k + 1 tokens per call
    assert out.stats["acceptance_rate"] == 1.0
    assert out.stats["tokens_per_target_call"] == pytest.approx(11 / 3)  # 4 + 4 + 3 per row
  assert 1.0 <= out.stats["tokens_per_target_call"] <= 4.0


def test_a_draft_vocab_keeps_greedy_output_and_proposes_only_its_tokens(target, drafts):
  """FR-Spec's subset head: the draft's logits over draft_vocab are its full logits there; greedy,
  the draft proposes its argmax within the subset, so a self-draft is right exactly where the
  target's argmax lies in it, and the output is the target's greedy output either way."""
  subset = [5, 0, 3, 1]  # not 2, which the target picks 5 times greedily
  features = jax.random.normal(jax.random.key(0), (2, 3, TARGET_CONFIG.embed_dim))
  other_head = Transformer(TARGET_CONFIG.replace(tie_embeddings=not TARGET_CONFIG.tie_embeddings), rngs=nnx.Rngs(1))
  for model in (target, other_head):  # a tied head and an untied one
    np.testing.assert_allclose(model.logits(features, jnp.asarray(subset)), model.logits(features)[..., subset])
  plain = infer.generate(target, PROMPTS, max_new_tokens=11)
  for draft, k in ((drafts["self"], 1), (drafts["poor"], 3)):
    out = infer.speculative_generate(target, draft, PROMPTS, max_new_tokens=11, num_draft_tokens=k, draft_vocab=subset)
    assert out.tokens == plain.tokens
  # Self-draft at k=1: each round proposes the argmax over the subset after the row's last token;
  # it is accepted exactly when that is the target's argmax (which is then in the subset).
  out = infer.speculative_generate(target, drafts["self"], PROMPTS, max_new_tokens=11, num_draft_tokens=1,
                                   draft_vocab=subset)
  in_subset = [t in subset for row in plain.tokens for t in row]
  assert 0 < out.stats["acceptance_rate"] < 1.0
  assert not all(in_subset)
  everything = infer.speculative_generate(target, drafts["self"], PROMPTS, max_new_tokens=11, num_draft_tokens=3,
                                          draft_vocab=[4, 1, 0, 5, 3, 2])  # every token, in another order
  assert everything.stats["acceptance_rate"] == 1.0 and everything.tokens == plain.tokens


def test_stop_tokens_cut_accepted_runs(target, drafts):
  plain = infer.generate(target, PROMPTS, max_new_tokens=11)
  stop = plain.tokens[0][5]
  expected = infer.generate(target, PROMPTS, max_new_tokens=11, stop_tokens=[stop])
  out = infer.speculative_generate(target, drafts["self"], PROMPTS, max_new_tokens=11, num_draft_tokens=4,
                                   stop_tokens=[stop])
  assert out.tokens == expected.tokens
  assert out.finish_reasons == expected.finish_reasons


def _exact_distribution(target, prompt, depth):
  """P(first `depth` tokens) under the target, from full forward passes over every prefix."""
  continuations = list(itertools.product(range(VOCAB), repeat=depth))
  sequences = jnp.asarray([prompt + list(c) for c in continuations])
  logprobs = jax.nn.log_softmax(target(sequences).astype(jnp.float32), axis=-1)  # [C, T, V]
  positions = len(prompt) - 1 + np.arange(depth)
  picked = np.asarray(logprobs)[:, positions][np.arange(len(continuations))[:, None], np.arange(depth),
                                             np.asarray(continuations)]
  return {c: float(np.exp(p.astype(np.float64).sum())) for c, p in zip(continuations, picked)}


def _chi_square_pvalue(samples, probabilities):
  """Pearson's test; cells expected to hold fewer than 5 samples are pooled into one."""
  counts = {}
  for s in samples:
    counts[s] = counts.get(s, 0) + 1
  n = len(samples)
  observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
  for cell, p in probabilities.items():
    if n * p >= 5:
      observed.append(counts.get(cell, 0))
      expected.append(n * p)
    else:
      pooled_o += counts.get(cell, 0)
      pooled_e += n * p
  observed.append(pooled_o)
  expected.append(pooled_e)
  observed, expected = np.array(observed), np.array(expected)
  statistic = ((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum()
  return stats.chi2.sf(statistic, len(observed) - 1)


@pytest.mark.parametrize("draft_name", ["poor", "self", "lookup"])
def test_sampled_tokens_follow_the_target_distribution(target, drafts, draft_name):
  prompt, depth, samples = [1, 2, 3], 3, 6000
  exact = _exact_distribution(target, prompt, depth)
  out = infer.speculative_generate(
      target, drafts[draft_name], [prompt] * samples, max_new_tokens=depth, num_draft_tokens=2,
      sampling=infer.Sampling(temperature=1.0), rng=jax.random.key(1),
  )
  drawn = [tuple(t[:depth]) for t in out.tokens]
  # At a fixed seed the test is deterministic; 1e-3 leaves room for an honest sampler.
  assert _chi_square_pvalue(drawn, exact) > 1e-3
  # ... and the test has power: the draft's own distribution is rejected decisively.
  if draft_name == "poor":
    assert out.stats["acceptance_rate"] < 0.9
    assert _chi_square_pvalue(drawn, _exact_distribution(drafts["poor"], prompt, depth)) < 1e-9


def test_sampled_tokens_with_a_draft_vocab_follow_the_target_distribution(target, drafts):
  """q is 0 off the draft's subset; the output is still exactly the target's distribution."""
  prompt, depth, samples = [1, 2, 3], 3, 6000
  out = infer.speculative_generate(
      target, drafts["poor"], [prompt] * samples, max_new_tokens=depth, num_draft_tokens=2,
      sampling=infer.Sampling(temperature=1.0), rng=jax.random.key(3), draft_vocab=[4, 1, 2],
  )
  assert _chi_square_pvalue([tuple(t[:depth]) for t in out.tokens], _exact_distribution(target, prompt, depth)) > 1e-3
  assert 0 < out.stats["acceptance_rate"] < 0.9


def test_plain_sampling_follows_the_target_distribution(target):
  prompt, depth, samples = [1, 2, 3], 3, 6000
  out = infer.generate(target, [prompt] * samples, max_new_tokens=depth, sampling=infer.Sampling(temperature=1.0),
                       rng=jax.random.key(2))
  assert _chi_square_pvalue([tuple(t) for t in out.tokens], _exact_distribution(target, prompt, depth)) > 1e-3


def test_bad_speculative_inputs_are_named(target):
  other_vocab = Transformer(TARGET_CONFIG.replace(vocab_size=VOCAB + 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="vocab_size"):
    infer.speculative_generate(target, other_vocab, PROMPTS, max_new_tokens=4)
  with pytest.raises(ValueError, match="num_draft_tokens"):
    infer.speculative_generate(target, target, PROMPTS, max_new_tokens=4, num_draft_tokens=0)
  with pytest.raises(ValueError, match="PromptLookup"):
    infer.speculative_generate(target, "ngram", PROMPTS, max_new_tokens=4)
  for bad, message in (([], "non-empty"), ([0, 6], r"\[0, 6\)"), ([1, 1, 2], "1 repeated"), ([[1, 2]], "1-D"),
                       ([0.5], "token ids")):
    with pytest.raises(ValueError, match=message):
      infer.speculative_generate(target, target, PROMPTS, max_new_tokens=4, draft_vocab=bad)
  with pytest.raises(ValueError, match="draft_vocab is for a draft model"):
    infer.speculative_generate(target, infer.PromptLookup(), PROMPTS, max_new_tokens=4, draft_vocab=[1, 2])
