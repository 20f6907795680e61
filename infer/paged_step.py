"""One serving-engine step on device: copy-on-write copies, the model over a flattened row of
tokens with the paged cache, and a token sampled for every sequence that reached its last token.

The host (infer/engine.py) pads every array to a bucketed size, so the step compiles once per
(tokens, block-table width, history) bucket and sampling variant (filters or not, top log-probs or
not); the cache is donated and updated in place.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from infer.decoding import _in_rules
from infer.row_sampling import RowSampling, sample_rows
from model import multi_lora
from model.kv_cache import PagedKVCache, PageTable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
  tokens: jax.Array  # [T] int32: the step's tokens, sequence after sequence, padding last
  positions: jax.Array  # [T] int32; -1 for padding
  seq_ids: jax.Array  # [T] int32: the token's row of block_tables
  block_tables: jax.Array  # [B, M] int32
  sample_at: jax.Array  # [B] int32: the index in T of the token whose logits pick the row's next token
  copy_from: jax.Array  # [C] int32: blocks to copy before the step ...
  copy_to: jax.Array  # [C] int32: ... and where (num_blocks: no copy)
  sampling: RowSampling  # [B] each
  history: jax.Array | None  # [B, G] int32 output tokens so far (-1 pads), only when a row has penalties
  adapter_ids: jax.Array | None  # [T] int32: each token's LoRA adapter (0: none), when the model serves several


def copy_blocks(cache: PagedKVCache, source: jax.Array, destination: jax.Array) -> PagedKVCache:
  def copy(pages):  # [L, P, bs, K, H]
    return pages.at[:, destination].set(pages[:, jnp.minimum(source, pages.shape[1] - 1)], mode="drop")

  return PagedKVCache(copy(cache.k), copy(cache.v))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_q_len", "filters", "top_logprobs", "mesh", "rules"),
                   donate_argnames=("cache",))
def paged_step(graphdef, params, cache: PagedKVCache, inputs: StepInputs, *, max_q_len, filters, top_logprobs, mesh,
               rules):
  """(cache, sampled: {tokens, logprobs [B], with top_logprobs: top_tokens, top_logprobs [B, 20]})."""
  with _in_rules(mesh, rules):
    model = nnx.merge(graphdef, params)
    if inputs.adapter_ids is not None:
      multi_lora.route(model, inputs.adapter_ids[None])
    cache = copy_blocks(cache, inputs.copy_from, inputs.copy_to)
    pages = PageTable(inputs.block_tables, inputs.seq_ids, max_q_len)
    features, cache = model.features(inputs.tokens[None], positions=inputs.positions[None], cache=cache, pages=pages)
    last = jnp.take(features[0], inputs.sample_at, axis=0)  # [B, D]
    logits = model.logits(last[None])[0]  # [B, V]
    return cache, sample_rows(logits, inputs.sampling, inputs.history, filters=filters, top_logprobs=top_logprobs)


@functools.partial(jax.jit, static_argnames=("config", "num_blocks", "block_size", "mesh", "rules"))
def empty_cache(*, config, num_blocks, block_size, mesh, rules) -> PagedKVCache:
  with _in_rules(mesh, rules):
    return PagedKVCache.create(config, num_blocks, block_size)
