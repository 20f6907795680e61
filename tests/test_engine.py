"""The serving engine (infer.Engine): continuous batching over a paged KV cache gives every request
what `infer.generate` gives it alone, whatever arrived with it, however its prompt was chunked and
however often it was preempted; blocks are all free afterwards; prefix-cache hits and forks give the
same tokens as misses; per-row sampling equals infer.sampling's single-setting filters row by row."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infer
from infer.detokenize import Detokenizer
from infer.row_sampling import RowSampling, sample_rows
from infer.sampling import Sampling, sampling_logprobs
from model import Transformer, get_preset

# GQA, a sliding window on alternate layers and both soft-caps: everything the paged path must honour.
CONFIG = get_preset("tiny").replace(
    num_layers=3, sliding_window=5, global_layer_every=2, attn_logit_softcap=4.0, final_logit_softcap=10.0,
    init_std=0.1, max_position_embeddings=64,
)
# Blocks of 4 and a pool of 40 (10 sequences of 16 tokens): 8 sequences of up to 46 tokens must
# preempt; a budget of 32 tokens a step chunks the longer prompts.
ENGINE = infer.EngineConfig(block_size=4, num_blocks=40, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64)


@pytest.fixture(scope="module")
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


def _held_blocks_match_refcounts(engine):
  """Every block's reference count is the number of sequences holding it."""
  held = collections.Counter(b for seq in [*engine.scheduler.running, *engine.scheduler.waiting] for b in seq.blocks)
  refs = engine.block_manager.refs
  return all(refs[b] == held.get(b, 0) for b in range(len(refs)))


def _run(engine, arrivals, check=None):
  """Adds (step, prompt, params) arrivals at their steps; the finished outputs by request id."""
  done, pending, step = {}, sorted(arrivals, key=lambda a: a[0]), 0
  while pending or engine.has_unfinished():
    while pending and pending[0][0] <= step:
      _, request_id, prompt, params = pending.pop(0)
      engine.add_request(prompt, params, request_id=request_id)
    for output in engine.step():
      if output.finished:
        done[output.request_id] = output
    if check:
      check(engine, step)
    step += 1
  return done


def test_each_request_equals_generate_alone_whatever_arrived_with_it(model):
  rng = np.random.default_rng(0)
  arrivals = []
  for i in range(50):
    prompt = rng.integers(0, CONFIG.vocab_size, rng.integers(1, 31)).tolist()
    arrivals.append((int(rng.integers(0, 40)), str(i), prompt, infer.SamplingParams(max_tokens=int(rng.integers(1, 17)))))
  engine = infer.Engine(model, None, ENGINE)
  assert engine.warmup() == 2 * 5  # token buckets 16, 32 x block-table widths 1, 2, 4, 8, 16
  compiled = set(engine.step_shapes)
  chunked = []
  done = _run(engine, arrivals, check=lambda e, _: chunked.extend(
      s for s in e.scheduler.running if 0 < s.num_computed < s.prompt_len))
  assert engine.scheduler.num_preemptions > 0 and chunked  # both happened
  assert engine.step_shapes == compiled  # serving met no shape the warm-up had not compiled
  for _, request_id, prompt, params in arrivals:
    alone = infer.generate(model, [prompt], max_new_tokens=params.max_tokens)
    assert done[request_id].outputs[0].token_ids == alone.tokens[0], request_id
  assert engine.block_manager.num_free == ENGINE.num_blocks


def test_the_pallas_kernel_serves_the_same_tokens(model):
  """attention_impl='pallas' runs the paged-attention kernel (TPU interpret mode on this CPU) inside
  the model: chunked prompts, decodes, a traced window (alternating layers) and soft-caps."""
  kernel_model = Transformer(CONFIG.replace(attention_impl="pallas"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (3, 30, 12, 1)]
  engine = infer.Engine(kernel_model, None, ENGINE)
  outputs = engine.generate(prompts, infer.SamplingParams(max_tokens=6))
  assert {shape[3] for shape in engine.step_shapes} >= {1, 32}  # decode-only steps and chunked ones
  for prompt, output in zip(prompts, outputs):
    assert output.outputs[0].token_ids == infer.generate(model, [prompt], max_new_tokens=6).tokens[0]


def test_blocks_are_all_free_after_random_requests_aborts_and_preemptions(model):
  rng = np.random.default_rng(1)
  prefixes = [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (9, 17)]  # shared prefixes: cache hits
  arrivals = []
  for i in range(200):
    prompt = (prefixes[i % 2] if i % 3 else []) + rng.integers(0, CONFIG.vocab_size, rng.integers(1, 12)).tolist()
    params = infer.SamplingParams(n=int(rng.choice([1, 1, 2])), temperature=float(rng.choice([0.0, 1.0])),
                                  max_tokens=int(rng.integers(1, 17)), seed=i)
    arrivals.append((i // 10, str(i), prompt, params))
  engine = infer.Engine(model, None, ENGINE)
  violations = []

  def check(engine, step):
    if step % 7 == 3 and engine.scheduler.running:  # abort a running request now and then
      engine.abort(engine.scheduler.running[-1].request.request_id)
    if not _held_blocks_match_refcounts(engine):
      violations.append(step)

  _run(engine, arrivals, check)
  assert not violations
  assert engine.scheduler.num_preemptions > 0 and engine.block_manager.hits > 0
  assert engine.block_manager.num_free == ENGINE.num_blocks and not any(engine.block_manager.refs)


def test_prefix_cache_hit_gives_the_same_tokens_and_allocates_fewer_blocks(model):
  prompt = list(range(1, 30))
  params = infer.SamplingParams(max_tokens=6)
  cold = infer.Engine(model, None, ENGINE)
  first = cold.generate([prompt], params)[0]
  misses = cold.block_manager.allocations
  second = cold.generate([prompt[:-3] + [7, 7, 7]], params)[0]  # shares 6 full blocks of 4
  assert cold.block_manager.hits == 6
  assert cold.block_manager.allocations - misses < misses
  uncached = infer.Engine(model, None, dataclasses_replace(ENGINE, enable_prefix_caching=False))
  expected = uncached.generate([prompt, prompt[:-3] + [7, 7, 7]], params)
  assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == [o.outputs[0].token_ids for o in expected]


def dataclasses_replace(config, **changes):
  import dataclasses  # noqa: PLC0415

  return dataclasses.replace(config, **changes)


def test_forked_completions_copy_on_write_and_sample_as_alone(model):
  prompt = list(range(3, 25))  # 22 tokens: the last prompt block is shared and partly full
  engine = infer.Engine(model, None, ENGINE)
  greedy = engine.generate([prompt], infer.SamplingParams(n=3, max_tokens=9))[0]
  alone = infer.generate(model, [prompt], max_new_tokens=9).tokens[0]
  assert [o.token_ids for o in greedy.outputs] == [alone] * 3
  sampled = infer.SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=9)
  forked = engine.generate([prompt], sampled)[0]
  single = engine.generate([prompt], infer.SamplingParams(temperature=1.0, seed=11, max_tokens=9))[0]
  assert forked.outputs[0].token_ids == single.outputs[0].token_ids
  assert forked.outputs[0].token_ids != forked.outputs[1].token_ids
  assert engine.block_manager.num_free == ENGINE.num_blocks


def test_seeded_samples_and_logprobs_do_not_depend_on_the_batch(model):
  params = infer.SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, seed=5, max_tokens=8, logprobs=3,
                                presence_penalty=0.4, frequency_penalty=0.2)
  prompt = [9, 8, 7, 6, 5]
  engine = infer.Engine(model, None, ENGINE)
  alone = engine.generate([prompt], params)[0].outputs[0]
  crowd = engine.generate([[1, 2, 3] * 5, prompt, [4] * 20], [infer.SamplingParams(max_tokens=12), params,
                                                              infer.SamplingParams(temperature=1.0, max_tokens=3)])
  assert crowd[1].outputs[0].token_ids == alone.token_ids
  # The log-probs are the raw model's: log_softmax of a full forward pass over prompt + output.
  sequence = prompt + alone.token_ids
  logits = np.asarray(model(jnp.asarray([sequence]))[0], np.float64)
  expected = jax.nn.log_softmax(logits[len(prompt) - 1: -1], axis=-1)
  for i, entry in enumerate(alone.logprobs):
    assert entry.token_id == alone.token_ids[i]
    np.testing.assert_allclose(entry.logprob, expected[i, entry.token_id], atol=1e-4)
    top = np.argsort(-expected[i])[:3]
    assert [t for t, _ in entry.top] == top.tolist()


def test_row_sampling_equals_single_setting_filters_row_by_row():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(4, 64)) * 3, jnp.float32)
  settings = [Sampling(temperature=0.7, top_k=5), Sampling(temperature=1.3, top_p=0.6),
              Sampling(temperature=1.0, min_p=0.2), Sampling(temperature=0.5, top_k=20, top_p=0.8, min_p=0.05)]
  rows = RowSampling(
      temperature=jnp.asarray([s.temperature for s in settings], jnp.float32),
      top_k=jnp.asarray([s.top_k or 0 for s in settings], jnp.int32),
      top_p=jnp.asarray([s.top_p or 1.0 for s in settings], jnp.float32),
      min_p=jnp.asarray([s.min_p or 0.0 for s in settings], jnp.float32),
      presence_penalty=jnp.zeros(4), frequency_penalty=jnp.zeros(4), seed=jnp.zeros(4, jnp.uint32),
      completion=jnp.zeros(4, jnp.int32), output_index=jnp.zeros(4, jnp.int32))
  from infer.row_sampling import filtered_sorted  # noqa: PLC0415

  order, ranked = filtered_sorted(logits, rows)
  for b, s in enumerate(settings):
    expected = np.asarray(sampling_logprobs(logits[b], s))
    kept = np.asarray(order[b])[np.isfinite(np.asarray(ranked[b]))]
    assert sorted(kept.tolist()) == np.flatnonzero(np.isfinite(expected)).tolist()
  # Penalties: OpenAI's closed form, then greedy picks the argmax of the penalized logits.
  history = jnp.asarray([[3, 3, 7, -1]] * 4, jnp.int32)
  penalized = rows.__class__(**{**rows.__dict__, "temperature": jnp.zeros(4), "presence_penalty": jnp.full(4, 0.5),
                                "frequency_penalty": jnp.full(4, 0.25)})
  expected = np.asarray(logits).copy()
  expected[:, 3] -= 0.5 + 2 * 0.25
  expected[:, 7] -= 0.5 + 0.25
  out = sample_rows(logits, penalized, history)
  np.testing.assert_array_equal(out["tokens"], expected.argmax(-1))


class _Chars:
  """A tokenizer with one character per id."""

  eos_id, bos_id, vocab_size = 0, -1, 27

  def decode(self, ids):
    return "".join(chr(96 + i) for i in ids)


def test_detokenizer_stops_at_stop_strings_and_holds_back_their_beginnings():
  d = Detokenizer(_Chars(), ("cd", "xyz"), frozenset({0}))
  assert not d.add(1) and d.text() == "a"
  assert not d.add(3) and d.text() == "a"  # "c" may begin "cd": held back while running
  assert not d.add(0) and d.text() == "a"  # a stop token is not shown
  assert d.add(4) and d.text(final=True) == "a"  # "acd": the text ends before "cd"


def test_bad_requests_get_clear_errors(model):
  engine = infer.Engine(model, None, ENGINE)
  with pytest.raises(ValueError, match="max_model_len=64"):
    engine.add_request(list(range(1, 60)), infer.SamplingParams(max_tokens=10))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    engine.add_request([CONFIG.vocab_size])
  with pytest.raises(ValueError, match="needs the engine's tokenizer"):
    engine.add_request("hello")
  for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(n=0), dict(logprobs=21), dict(max_tokens=0),
              dict(presence_penalty=3.0), dict(stop=[""])):
    with pytest.raises(ValueError, match=f"SamplingParams.{next(iter(bad))}"):
      infer.SamplingParams(**bad)
  engine.add_request([1, 2, 3], request_id="a")
  engine.abort("a")
  assert not engine.has_unfinished() and engine.block_manager.num_free == ENGINE.num_blocks


def test_rows_of_one_step_use_different_lora_adapters():
  """Two PEFT LoRA adapters (one saved by PEFT, one by model.peft) and the base served at once: each request
  gets what its adapter, merged into the base (model.peft, checked against PEFT), gives alone."""
  from pathlib import Path  # noqa: PLC0415

  from model import hf, peft, projections  # noqa: PLC0415

  fixtures = Path(__file__).parent / "fixtures"
  base = hf.from_pretrained(fixtures / "hf" / "llama", dtype="float32", param_dtype="float32")
  paths = {"peft": str(fixtures / "peft" / "lora"), "ours": str(fixtures / "peft" / "ours_lora")}
  engine = infer.Engine(base, None, ENGINE, adapters=paths)
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, base.config.vocab_size, n).tolist() for n in (5, 15, 9, 14, 3, 12)]
  names = [None, "peft", "ours", "ours", None, "peft"]
  for i, (prompt, name) in enumerate(zip(prompts, names)):
    engine.add_request(prompt, infer.SamplingParams(max_tokens=7), request_id=str(i), adapter=name)
  done = {}
  while engine.has_unfinished():
    done.update({o.request_id: o for o in engine.step() if o.finished})
  merged = {None: base}
  for name, path in paths.items():
    merged[name] = peft.merge(peft.load_adapter(projections.shallow_copy(base), path))
  for i, (prompt, name) in enumerate(zip(prompts, names)):
    alone = infer.generate(merged[name], [prompt], max_new_tokens=7).tokens[0]
    assert done[str(i)].outputs[0].token_ids == alone, (i, name)
  assert len({tuple(done[str(i)].outputs[0].token_ids) for i in (1, 2)}) == 2  # the adapters differ
  with pytest.raises(ValueError, match="not one of this engine's adapters"):
    engine.add_request([1, 2], adapter="missing")
