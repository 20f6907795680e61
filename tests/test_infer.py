"""Generation with a KV cache: cached logits equal full forward passes, greedy output equals
transformers' generate(), sampling filters keep exactly the right tokens, and the loop's bookkeeping
(stop tokens, lengths, per-row seeds, statistics, streaming, a mesh) is right."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infer
from infer import decoding
from infer.sampling import argmax, sampling_logprobs
from model import Transformer, get_preset, hf, sharding

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# GQA (4 query heads on 2 kv heads), a window (5) shorter than the sequences, alternating
# local/global layers and both soft-caps: everything the cache must honour.
CONFIG = get_preset("tiny").replace(
    dtype="float32", param_dtype="float32", num_layers=3, sliding_window=5, global_layer_every=2,
    attn_logit_softcap=4.0, final_logit_softcap=10.0, init_std=0.1,
)
PROMPTS = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1], [42]]


@pytest.fixture(scope="module")
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def _full_logits(model, sequence):
  return np.asarray(_forward(model, jnp.asarray([sequence]))[0])  # [T, V]; jitted: a compile per length, not per op


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("prefill", ["positions", "from_start"])
def test_cached_decode_logits_equal_full_forward(scan_layers, prefill):
  # from_start: positions=None, the prefill that attends within the chunk and writes slots 0..T-1.
  model = Transformer(CONFIG.replace(scan_layers=scan_layers), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  lengths = np.array([3, 8, 1])
  steps = 9  # past the window: early slots must drop out of view
  sequences = rng.integers(0, CONFIG.vocab_size, (3, 8 + steps))
  # Right-padded prompts whose padding is garbage: the cache must never let a query see it.
  padded = np.where(np.arange(8) < lengths[:, None], sequences[:, :8], rng.integers(0, CONFIG.vocab_size, (3, 8)))
  cache = model.init_cache(3, 32)
  cached = nnx.jit(lambda model, tokens, positions, cache: model(tokens, positions=positions, cache=cache))
  positions = None if prefill == "from_start" else jnp.broadcast_to(jnp.arange(8), (3, 8))
  logits, cache = cached(model, jnp.asarray(padded), positions, cache)
  full = np.asarray(_forward(model, jnp.asarray(sequences)))  # [3, T, V]
  for b in range(3):
    np.testing.assert_allclose(logits[b, : lengths[b]], full[b][: lengths[b]], atol=1e-5)
  positions = jnp.asarray(lengths)
  for _ in range(steps):
    tokens = jnp.asarray(sequences[np.arange(3), np.asarray(positions)])[:, None]
    logits, cache = cached(model, tokens, positions[:, None], cache)  # jitted: one compile, not one per op
    for b in range(3):
      np.testing.assert_allclose(logits[b, 0], full[b][int(positions[b])], atol=1e-5)
    positions = positions + 1


def test_argmax_picks_numpys_index_among_ties_nans_and_infinities():
  x = np.array([[1, 3, 3, 2], [np.nan, 1, np.nan, 5], [-np.inf] * 4, [0, np.inf, 1, np.inf], [2, 1, 0, -1]], np.float32)
  wide = np.random.default_rng(0).standard_normal((3, 5, 4096)).astype(np.float32)
  wide[0, 0, [17, 900]] = 10.0  # a tie far apart
  wide[1, 2, [3000, 3500]] = np.nan  # NaNs after the largest value (XLA:CPU's max may not return NaN here)
  for array in (x, wide):
    got = jax.jit(argmax)(jnp.asarray(array))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.argmax(array, axis=-1))
  np.testing.assert_array_equal(argmax(jnp.asarray(wide, jnp.bfloat16)), np.argmax(wide.astype(jnp.bfloat16), -1))


def test_greedy_generation_equals_argmax_of_full_forward(model):
  out = infer.generate(model, PROMPTS, max_new_tokens=12)
  for prompt, tokens, model_logprobs, entropies, top1 in zip(
      PROMPTS, out.tokens, out.model_logprobs, out.entropies, out.top1_probs
  ):
    sequence = list(prompt) + tokens
    logits = _full_logits(model, sequence)[len(prompt) - 1: -1]  # the distributions the tokens came from
    assert tokens == logits.argmax(-1).tolist()
    logprobs = jax.nn.log_softmax(logits.astype(np.float64), axis=-1)
    np.testing.assert_allclose(model_logprobs, logprobs[np.arange(len(tokens)), tokens], atol=1e-5)
    np.testing.assert_allclose(entropies, -(np.exp(logprobs) * logprobs).sum(-1), atol=1e-5)
    np.testing.assert_allclose(top1, np.exp(logprobs).max(-1), atol=1e-6)
  np.testing.assert_array_equal(out.lengths, [12, 12, 12])
  assert out.finish_reasons == ["length"] * 3
  np.testing.assert_allclose(out.logprobs[0], 0.0)  # greedy: the sampling distribution is a point mass
  np.testing.assert_allclose(out.confidence, [lp.mean() for lp in out.model_logprobs], rtol=1e-6)


@pytest.mark.parametrize("name", ["llama", "llama3_rope", "llama_yarn_rope", "mistral", "qwen2", "gemma", "gemma2"])
def test_greedy_equals_transformers_generate(name):
  reference = np.load(FIXTURES / name / "reference.npz")
  model = hf.from_pretrained(FIXTURES / name)
  out = infer.generate(model, reference["greedy_prompt"].tolist(), max_new_tokens=10)
  assert out.tokens == reference["greedy_tokens"].tolist()


def test_stop_tokens_lengths_and_reasons(model):
  greedy = infer.generate(model, PROMPTS, max_new_tokens=12).tokens
  stop = greedy[1][4]
  out = infer.generate(model, PROMPTS, max_new_tokens=12, stop_tokens=[stop])
  for row, tokens in enumerate(greedy):
    expected = tokens[: tokens.index(stop) + 1] if stop in tokens else tokens
    assert out.tokens[row] == expected
    assert out.finish_reasons[row] == ("stop" if stop in tokens else "length")
  assert out.lengths[1] == 5


def test_sampled_rows_depend_only_on_their_seed(model):
  sampling = infer.Sampling(temperature=1.0, top_k=50)
  together = infer.generate(model, PROMPTS, max_new_tokens=8, sampling=sampling, rng=[11, 12, 13])
  alone = infer.generate(model, [PROMPTS[1]], max_new_tokens=8, sampling=sampling, rng=[12])
  assert together.tokens[1] == alone.tokens[0]
  other = infer.generate(model, PROMPTS, max_new_tokens=8, sampling=sampling, rng=[11, 99, 13])
  assert other.tokens[0] == together.tokens[0] and other.tokens[1] != together.tokens[1]
  # Sampled tokens are never outside the top 50, and their sampling log-probs are those of the filter.
  for prompt, tokens, logprobs in zip(PROMPTS, together.tokens, together.logprobs):
    logits = _full_logits(model, list(prompt) + tokens)[len(prompt) - 1: -1]
    expected = sampling_logprobs(jnp.asarray(logits), sampling)
    np.testing.assert_allclose(logprobs, np.asarray(expected)[np.arange(len(tokens)), tokens], atol=1e-5)
    assert np.all(np.isfinite(logprobs))


def test_stream_yields_the_same_tokens(model):
  chunks = list(infer.stream(model, PROMPTS, max_new_tokens=10, chunk=3))
  joined = [sum((chunk[row] for chunk in chunks), []) for row in range(len(PROMPTS))]
  assert joined == infer.generate(model, PROMPTS, max_new_tokens=10).tokens
  assert len(chunks) >= 4  # the first token, then 3 + 3 + 3 decode steps


def test_generation_on_a_mesh_matches_one_device(model):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(model)
  sharded = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))
  prompts = PROMPTS + [[1, 2], [3]] * 2 + [[7] * 11]  # 8 rows: the batch splits over data x fsdp
  out = infer.generate(sharded, prompts, max_new_tokens=6)
  assert out.tokens == infer.generate(model, prompts, max_new_tokens=6).tokens
  # The cache [L, B, K, S, H] is placed like activations: batch over data x fsdp, kv heads over tensor.
  _, state = decoding._start(sharded, prompts, max_new_tokens=6)
  assert state.cache.k.sharding.mesh == mesh
  spec = tuple(state.cache.k.sharding.spec)
  assert spec + (None,) * (5 - len(spec)) == (None, ("data", "fsdp"), "tensor", None, None)


# ------------------------------------------------------------------ sampling filters on hand-made logits
LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.2], np.float32))  # sorted: 1 (.4), 3 (.25), 4 (.2), 2 (.1), 0 (.05)


@pytest.mark.parametrize(
    "sampling, kept",
    [
        (infer.Sampling(temperature=1.0), [0, 1, 2, 3, 4]),
        (infer.Sampling(temperature=0.0), [1]),
        (infer.Sampling(temperature=1.0, top_k=1), [1]),
        (infer.Sampling(temperature=1.0, top_k=3), [1, 3, 4]),
        (infer.Sampling(temperature=1.0, top_p=0.35), [1]),  # .4 alone reaches .35
        (infer.Sampling(temperature=1.0, top_p=0.5), [1, 3]),  # .4 < .5, .65 >= .5
        (infer.Sampling(temperature=1.0, top_p=0.9), [1, 2, 3, 4]),  # .85 < .9
        (infer.Sampling(temperature=1.0, min_p=0.5), [1, 3, 4]),  # p >= .2
        (infer.Sampling(temperature=1.0, min_p=0.6), [1, 3]),  # p >= .24
        (infer.Sampling(temperature=1.0, top_k=3, top_p=0.6), [1, 3]),  # over .4/.85, .25/.85: .47 < .6
        (infer.Sampling(temperature=1.0, top_p=0.9, min_p=0.3), [1, 3, 4]),  # after top-p: >= .3 * .4/.95
    ],
)
def test_filters_keep_exactly_the_right_tokens(sampling, kept):
  logprobs = np.asarray(sampling_logprobs(jnp.asarray(LOGITS)[None], sampling))[0]
  assert np.flatnonzero(np.isfinite(logprobs)).tolist() == kept
  probs = np.exp(LOGITS.astype(np.float64))
  if not sampling.greedy:
    expected = np.where(np.isin(np.arange(5), kept), probs, 0) / probs[kept].sum()
    np.testing.assert_allclose(np.exp(logprobs), expected, atol=1e-6)


def test_temperature_scales_the_logits():
  logprobs = sampling_logprobs(jnp.asarray(LOGITS)[None], infer.Sampling(temperature=0.5))[0]
  expected = np.exp(2 * LOGITS.astype(np.float64)) / np.exp(2 * LOGITS.astype(np.float64)).sum()
  np.testing.assert_allclose(np.exp(logprobs), expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"), (dict(min_p=2.0), "min_p"),
    ],
)
def test_bad_sampling_values_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    infer.Sampling(**kwargs)


def test_bad_generate_inputs_are_named(model):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    infer.generate(model, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="token id 999"):
    infer.generate(model, [[1, 999]], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    infer.generate(model, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="stop_tokens"):
    infer.generate(model, [[1]], max_new_tokens=2, stop_tokens=[-3])
  with pytest.raises(ValueError, match="per-row seeds"):
    infer.generate(model, [[1], [2]], max_new_tokens=2, rng=[1, 2, 3])


def test_buckets_bound_the_number_of_compiled_shapes():
  assert [decoding.bucket(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]
