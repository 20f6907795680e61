"""Draft-model speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").

Each round, per row: the draft proposes k tokens d_1..d_k from its sampling distribution q; the
target scores [last, d_1..d_k] in one pass, giving p_0..p_k; d_j is accepted with probability
min(1, p_{j-1}(d_j) / q_{j-1}(d_j)) until the first rejection, which is replaced by a sample from
norm(max(p - q, 0)); if all k are accepted a bonus token is drawn from p_k. The emitted tokens are
distributed exactly as the target's sampling distribution (the same `Sampling` applies to both
models; at temperature 0 the output is the target's greedy output).

The draft is a model (a small one distilled from the target, or the target's own early layers) or
`PromptLookup` (n-gram proposals from the row's own context, infer/prompt_lookup.py: a point-mass q,
so acceptance is p(d_j) and the residual is p without d_j).

Both caches follow the convention of model/kv_cache.py (slot = position): a row's `last` token
is not yet in either cache, and the slots a rejection leaves stale lie beyond the row's position,
so they are overwritten before anything attends to them. Rows advance by different amounts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer import decoding as gen
from infer import prompt_lookup
from infer.prompt_lookup import PromptLookup
from infer.sampling import Sampling, argmax, sample, sampling_logprobs, token_statistics
from model import sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeculativeState:
  target_cache: object
  draft_cache: object  # the draft model's KV cache, or for PromptLookup the [B, S] token history
  last: jax.Array  # [B] the last token (prompt or emitted), in neither cache yet ...
  positions: jax.Array  # [B] ... and its position
  lengths: jax.Array  # [B] tokens emitted
  done: jax.Array  # [B] bool
  stopped: jax.Array  # [B] bool
  keys: jax.Array  # [B] PRNG keys
  tokens: jax.Array  # [B, N] output buffer
  statistics: dict  # gen.STATISTICS -> [B, N]
  target_calls: jax.Array  # [B] rounds the row took part in
  accepted: jax.Array  # [B] draft tokens accepted
  proposed: jax.Array  # [B] draft tokens proposed


def _key(keys, lengths, salt):
  """[B] keys unique per row, per round (lengths grow every round) and per use."""
  return jax.vmap(lambda key, n: jax.random.fold_in(jax.random.fold_in(key, n), salt))(keys, lengths)


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "cache_length", "buffer", "mesh", "rules"))
def _prefill(target_def, target_params, draft_def, draft_params, tokens, lengths, keys, *, cache_length, buffer, mesh,
             rules) -> SpeculativeState:
  """Both models read the prompts into their caches; no logits are needed (the last prompt token is fed next)."""
  with gen._in_rules(mesh, rules):
    batch, prompt_len = tokens.shape
    caches = []
    for graphdef, params in ((target_def, target_params), (draft_def, draft_params)):
      if isinstance(graphdef, PromptLookup):  # the history: the prompt, then each emitted token
        caches.append(jnp.zeros((batch, cache_length), jnp.int32).at[:, :prompt_len].set(tokens))
        continue
      model = nnx.merge(graphdef, params)
      _, cache = model.features(tokens, cache=model.init_cache(batch, cache_length))
      caches.append(cache)
    lengths = lengths.astype(jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    return SpeculativeState(
        target_cache=caches[0], draft_cache=caches[1],
        last=jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0], positions=lengths - 1,
        lengths=zeros, done=jnp.zeros((batch,), bool), stopped=jnp.zeros((batch,), bool), keys=keys,
        tokens=jnp.zeros((batch, buffer), jnp.int32),
        statistics={k: jnp.zeros((batch, buffer), jnp.float32) for k in gen.STATISTICS},
        target_calls=zeros, accepted=zeros, proposed=zeros,
    )


def _round(state: SpeculativeState, target, draft_def, draft_params, draft_vocab, *, k, sampling, stop_tokens,
           max_new_tokens):
  # 1. The draft proposes d_1..d_k with their distributions q_0..q_{k-1} [B, k, V].
  if isinstance(draft_def, PromptLookup):
    draft_cache = state.draft_cache
    proposals = prompt_lookup.propose(draft_cache, state.positions, k, draft_def)  # [B, k]
    q = None
    if not sampling.greedy:
      vocab = target.config.vocab_size
      q = jnp.where(jax.nn.one_hot(proposals, vocab, dtype=bool), 0.0, -jnp.inf)  # a point mass on each
  else:
    draft_cache, proposals, q = _draft_proposals(state, draft_def, draft_params, draft_vocab, k=k, sampling=sampling)
  if q is not None:
    q = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # [B, k + 1, V]; q_k is never used
  return _verify(state, target, draft_cache, proposals, q, k=k, sampling=sampling, stop_tokens=stop_tokens,
                 max_new_tokens=max_new_tokens, history=isinstance(draft_def, PromptLookup))


def _draft_proposals(state, draft_def, draft_params, draft_vocab, *, k, sampling):
  """The draft model samples d_1..d_k, then reads d_k into its cache (no logits needed for that).
  Greedy, q is not formed: a point mass on d_j, which _verify's greedy branch needs no array for.
  With draft_vocab [V'] the draft's head scores only those tokens, and q is 0 off them."""

  def draft_step(carry, j):
    cache, token, params = carry
    draft = nnx.merge(draft_def, params)
    features, cache = draft.features(token[:, None], positions=(state.positions + j)[:, None], cache=cache)
    logits = draft.logits(features, draft_vocab)[:, 0]  # [B, V] or [B, V']
    pick = (lambda i: i) if draft_vocab is None else (lambda i: draft_vocab[i])
    if sampling.greedy:
      proposal = pick(argmax(logits))
      return (cache, proposal, params), (proposal, None)
    q = sampling_logprobs(logits, sampling)
    proposal = pick(sample(_key(state.keys, state.lengths, j), q, sampling))
    if draft_vocab is not None:  # back to the whole vocabulary, 0 probability off the subset
      q = jnp.full((q.shape[0], draft.config.vocab_size), -jnp.inf, q.dtype).at[:, draft_vocab].set(q)
    return (cache, proposal, params), (proposal, q)

  (draft_cache, last_proposal, _), (proposals, q) = jax.lax.scan(
      draft_step, (state.draft_cache, state.last, draft_params), jnp.arange(k)
  )
  _, draft_cache = nnx.merge(draft_def, draft_params).features(
      last_proposal[:, None], positions=(state.positions + k)[:, None], cache=draft_cache
  )
  q = None if q is None else jnp.moveaxis(q, 0, 1)
  return draft_cache, proposals.T, q  # [B, k]: d_1..d_k; [B, k, V]: q_0..q_{k-1} (None when greedy)


def _verify(state, target, draft_cache, proposals, q, *, k, sampling, stop_tokens, max_new_tokens, history):
  batch = state.last.shape[0]
  rows = jnp.arange(batch)
  active = ~state.done

  # 2. The target scores [last, d_1..d_k] in one pass: p_0..p_k.
  inputs = jnp.concatenate([state.last[:, None], proposals], axis=1)  # [B, k + 1]
  positions = state.positions[:, None] + jnp.arange(k + 1)
  target_logits, target_cache = target(inputs, positions=positions, cache=state.target_cache)
  if sampling.greedy:
    n, emitted, logprobs = _greedy_acceptance(target_logits, proposals)
  else:
    n, emitted, logprobs = _sampled_acceptance(state, target_logits, proposals, q, k=k, sampling=sampling)

  # 5. Emit d_1..d_n and the extra token, cut at a stop token and at the budget.
  count = n + 1
  if stop_tokens:
    is_stop = jnp.isin(emitted, jnp.asarray(stop_tokens, jnp.int32)) & (jnp.arange(k + 1) < count[:, None])
    first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1), k + 1)
    count = jnp.minimum(count, first_stop + 1)
    hit_stop = first_stop < count
  else:
    hit_stop = jnp.zeros((batch,), bool)
  count = jnp.where(active, jnp.minimum(count, max_new_tokens - state.lengths), 0)
  values = {"logprobs": logprobs, **token_statistics(target_logits, emitted)}
  offsets = jnp.arange(k + 1)
  columns = jnp.where(offsets < count[:, None], state.lengths[:, None] + offsets, state.tokens.shape[1])  # drop the rest
  out_tokens = state.tokens.at[rows[:, None], columns].set(emitted, mode="drop")
  statistics = {name: state.statistics[name].at[rows[:, None], columns].set(values[name], mode="drop")
                for name in gen.STATISTICS}
  lengths = state.lengths + count
  stop_now = active & hit_stop
  new_last = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
  if history:
    draft_cache = prompt_lookup.record(draft_cache, state.positions, emitted, count)
  return dataclasses.replace(
      state, target_cache=target_cache, draft_cache=draft_cache,
      last=jnp.where(active, new_last, state.last), positions=state.positions + count,
      lengths=lengths, done=state.done | stop_now | (lengths >= max_new_tokens), stopped=state.stopped | stop_now,
      tokens=out_tokens, statistics=statistics,
      target_calls=state.target_calls + active, accepted=state.accepted + jnp.where(active, n, 0),
      proposed=state.proposed + jnp.where(active, k, 0),
  )


def _sampled_acceptance(state, target_logits, proposals, q, *, k, sampling):
  """Steps 3 and 4 of the module docstring: [B] accepted draft tokens n, [B, k + 1] the emitted
  tokens (the first n + 1 are real) and their log-probabilities under the sampling distribution."""
  p = sampling_logprobs(target_logits, sampling)  # [B, k + 1, V]
  # 3. Accept d_j with probability min(1, p_{j-1}(d_j) / q_{j-1}(d_j)), up to the first rejection.
  p_draft = jnp.take_along_axis(p[:, :k], proposals[..., None], axis=-1)[..., 0]  # [B, k]
  q_draft = jnp.take_along_axis(q[:, :k], proposals[..., None], axis=-1)[..., 0]
  uniform = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_key(state.keys, state.lengths, k + 1))
  accept = uniform < jnp.exp(p_draft - q_draft)  # q > 0: d_j was drawn from q
  n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)  # [B] accepted draft tokens

  # 4. The token after them: from norm(max(p_n - q_n, 0)) after a rejection, from p_k if none.
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
  q_n = jnp.take_along_axis(q, n[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(jnp.exp(p_n) - jnp.where((n < k)[:, None], jnp.exp(q_n), 0.0), 0.0)
  residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, jnp.exp(p_n))  # rounding guard
  extra = sample(_key(state.keys, state.lengths, k + 2), jnp.log(residual), sampling)
  emitted = jnp.where(jnp.arange(k + 1) < n[:, None], jnp.pad(proposals, ((0, 0), (0, 1))), extra[:, None])
  return n, emitted, jnp.take_along_axis(p, emitted[..., None], axis=-1)[..., 0]


def _greedy_acceptance(target_logits, proposals):
  """The same at temperature 0, where p and q are point masses: d_j is accepted when it is the
  target's argmax after d_1..d_{j-1}, and the token after the accepted run is the argmax there, so
  the emitted tokens are the target's argmaxes themselves (each with log-probability 0)."""
  best = argmax(target_logits)  # [B, k + 1]
  n = jnp.sum(jnp.cumprod(proposals == best[:, :-1], axis=1), axis=1)
  return n, best, jnp.zeros(best.shape, jnp.float32)


@functools.partial(
    jax.jit, static_argnames=("target_def", "draft_def", "k", "sampling", "stop_tokens", "mesh", "rules"),
    donate_argnames=("state",),
)
def _decode(target_def, target_params, draft_def, draft_params, draft_vocab, state, max_new_tokens, *, k, sampling,
            stop_tokens, mesh, rules) -> SpeculativeState:
  with gen._in_rules(mesh, rules):

    def body(carry):  # parameters ride in the carry: see infer.decoding.decode
      state, target_params, draft_params = carry
      target = nnx.merge(target_def, target_params)
      state = _round(state, target, draft_def, draft_params, draft_vocab, k=k, sampling=sampling,
                     stop_tokens=stop_tokens, max_new_tokens=max_new_tokens)
      return state, target_params, draft_params

    carry = (state, target_params, draft_params)
    return jax.lax.while_loop(lambda carry: ~jnp.all(carry[0].done), body, carry)[0]


def _draft_vocab(draft_vocab, draft, vocab_size: int) -> jax.Array:
  if isinstance(draft, PromptLookup):
    raise ValueError("draft_vocab is for a draft model's head; PromptLookup proposes tokens of the context")
  if not draft.config.tie_embeddings and isinstance(getattr(draft, "lm_head", None), nnx.Module):
    raise ValueError("draft_vocab: the draft's LM head is a module (quantized or adapted) that computes every "
                     "token's logit; give the draft a plain head")
  ids = np.asarray(draft_vocab)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"draft_vocab must be a non-empty 1-D sequence of token ids, got shape {ids.shape} {ids.dtype}")
  if ids.min() < 0 or ids.max() >= vocab_size or len(np.unique(ids)) != ids.size:
    raise ValueError(f"draft_vocab must hold distinct token ids in [0, {vocab_size}); got min {ids.min()}, "
                     f"max {ids.max()}, {ids.size - len(np.unique(ids))} repeated")
  return jnp.asarray(ids, jnp.int32)


def speculative_generate(
    target: nnx.Module,
    draft: "nnx.Module | PromptLookup",
    prompts,
    *,
    max_new_tokens: int,
    num_draft_tokens: int = 4,
    sampling: Sampling = Sampling(),
    rng=None,
    stop_tokens=(),
    mesh=None,
    rules=None,
    draft_vocab=None,
) -> gen.Generation:
  """Generates as `generate(target, ...)` would (same distribution), with `draft` proposing
  num_draft_tokens tokens per target call: a model sharing the target's vocabulary, or
  `infer.PromptLookup()` (n-gram proposals from each row's own prompt and output; no model).

  draft_vocab: optional token ids a draft model proposes from (FR-Spec, Zhao et al. 2025: its most
  frequent tokens), so its LM head, most of a small draft's step, scores only those. The output
  distribution stays the target's whatever the subset; a target token outside it is never proposed.

  The result's `stats`: acceptance_rate (accepted / proposed draft tokens), tokens_per_target_call
  (generated tokens per scoring pass of the target, prompt prefill not counted) and target_calls.
  """
  if not isinstance(num_draft_tokens, (int, np.integer)) or num_draft_tokens < 1:
    raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be a positive int")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling must be an infer.Sampling, got {type(sampling).__name__}")
  vocab_size = target.config.vocab_size
  if not isinstance(draft, (PromptLookup, nnx.Module)):
    raise ValueError(f"draft must be an nnx.Module or an infer.PromptLookup, got {type(draft).__name__}")
  if isinstance(draft, nnx.Module) and draft.config.vocab_size != vocab_size:
    raise ValueError(f"the draft's vocab_size={draft.config.vocab_size} differs from the target's {vocab_size}")
  vocab = None if draft_vocab is None else _draft_vocab(draft_vocab, draft, vocab_size)
  stop_tokens = tuple(int(t) for t in stop_tokens)
  tokens, lengths = gen.pad_prompts(prompts, vocab_size)
  target_def, target_params = nnx.split(gen.decoding_view(target, mesh))
  draft_def, draft_params = (draft, None) if isinstance(draft, PromptLookup) else nnx.split(gen.decoding_view(draft, mesh))
  mesh = mesh if mesh is not None else gen.mesh_of(target_params)
  rules = sharding.with_default_rules(rules if rules is not None else sharding.DEFAULT_RULES) if mesh else None
  k = int(num_draft_tokens)
  buffer = gen.bucket(max_new_tokens)
  state = _prefill(
      target_def, target_params, draft_def, draft_params, jnp.asarray(tokens), jnp.asarray(lengths),
      gen.row_keys(rng, len(prompts)), cache_length=tokens.shape[1] + buffer + k + 1, buffer=buffer, mesh=mesh,
      rules=rules,
  )
  state = _decode(target_def, target_params, draft_def, draft_params, vocab, state, max_new_tokens, k=k, sampling=sampling,
                  stop_tokens=stop_tokens, mesh=mesh, rules=rules)
  generation = gen.to_generation(state)
  calls, accepted, proposed = (int(np.asarray(x).sum()) for x in (state.target_calls, state.accepted, state.proposed))
  generation.stats = {
      "acceptance_rate": accepted / max(proposed, 1),
      "tokens_per_target_call": float(generation.lengths.sum()) / max(calls, 1),
      "target_calls": calls,
  }
  return generation
