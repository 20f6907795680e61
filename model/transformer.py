"""The decoder: embedding -> L blocks -> final norm -> logits. Every family is a ModelConfig of it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.kv_cache import KVCache, PagedKVCache, PageTable
from model.layers import BTD, Block, Norm, param
from model.projections import weight_einsum
from model.sharding import shard

BTV = ("activation_batch", "activation_length", "activation_vocab")

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """[B, T] positions that restart at 0 where the segment id changes (packed rows)."""
  index = jnp.arange(segment_ids.shape[1])[None, :]
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


# The weight is cast to the compute dtype inside a checkpoint: the backward pass casts it again
# instead of keeping a [V, D] copy alive from the forward pass (a frozen head's whole memory when
# fine-tuning adapters on a bf16 or float32 base).
@functools.partial(jax.checkpoint, static_argnums=(0, 3), policy=jax.checkpoint_policies.nothing_saveable)
def _output_projection(eq: str, features: jax.Array, weight: jax.Array, dtype) -> jax.Array:
  return weight_einsum(eq, features, weight.astype(dtype), preferred_element_type=jnp.float32)


class Transformer(nnx.Module):
  """Decoder-only transformer: `model(tokens [B, T]) -> logits [B, T, V]` (float32)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.embedding = param(rngs, (c.vocab_size, c.embed_dim), ("vocab", "embed"), c)  # VD
    if c.scan_layers:
      # One Block whose every weight has a leading L axis; scanned over in __call__.
      @nnx.split_rngs(splits=c.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(c, rngs=rngs)

      self.layers = make_blocks(rngs)
    else:
      self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = Norm(c, rngs=rngs)
    if not c.tie_embeddings:
      self.lm_head = param(rngs, (c.embed_dim, c.vocab_size), ("embed", "vocab"), c)  # DV

  def features(
      self,
      tokens: jax.Array,  # [B, T] int
      *,
      positions: jax.Array | None = None,  # [B, T]; default 0..T-1, restarting per segment
      segment_ids: jax.Array | None = None,  # [B, T]; tokens attend only within their segment
      cache: KVCache | PagedKVCache | None = None,  # [L, B, K, S, H]; tokens sit at slots positions[:, 0] + 0..T-1
      pages: PageTable | None = None,  # with a PagedKVCache: tokens [1, T] of many sequences, flattened
  ):
    """(final-normed hidden states [B, T, D], cache): the input of the output projection or of a
    head, and the cache with this chunk's keys and values written (None when decoding without one).

    A KVCache with positions=None is a prefill: the chunk starts its rows (positions and slots
    0..T-1), so its queries see only its own keys and attention runs as in training (causal tiles or blocks,
    the fused backends) instead of over all S slots.
    """
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if pages is not None and positions is None:
      raise ValueError("a PagedKVCache needs the tokens' positions [1, T]")
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are not used with a KV cache: one sequence per row")
    from_start = cache is not None and positions is None
    if (pages is None) != (cache is None or isinstance(cache, KVCache)):
      raise ValueError("a PagedKVCache needs its PageTable (pages=), and only it takes one")
    if positions is None:
      if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      else:
        positions = segment_positions(segment_ids)
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(c.compute_dtype)
    if c.scale_embeddings:  # Gemma: the normalizer is rounded to the compute dtype first
      x = x * jnp.asarray(c.embed_dim**0.5, c.compute_dtype)
    x = shard(x, BTD)

    if cache is None:
      return self.final_norm(self._blocks(x, positions, segment_ids)), None
    x, cache = self._cached_blocks(x, positions, cache, pages, from_start)
    return self.final_norm(x), cache

  def _blocks(self, x, positions, segment_ids):
    c = self.config

    def block_fn(x, block, window):
      # Remat wraps the block with the window closed over: as an argument, a static window would be
      # traced, and the fused attention backends (pallas, cudnn) take only a static one.
      def run(x, block):
        return block(x, positions=positions, segment_ids=segment_ids, sliding_window=window)

      if c.remat_policy != "none":
        run = nnx.remat(run, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
      return run(x, block)

    # A window as long as the row is no window: then it stays static when layers alternate (Gemma 2
    # at T <= 4096), and the fused backends can take it.
    windows = [w if w < x.shape[1] else 0 for w in (c.layer_window(i) for i in range(c.num_layers))]
    if not c.scan_layers:
      for block, window in zip(self.layers, windows):
        x = block_fn(x, block, window)
    elif len(set(windows)) == 1:  # the window is static: every backend can use it
      x = nnx.scan(
          lambda x, block: block_fn(x, block, windows[0]),
          in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"},
      )(x, self.layers)
    else:  # alternating local/global layers (Gemma 2): the window is scanned over
      x = nnx.scan(
          block_fn, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"},
      )(x, self.layers, jnp.asarray(windows, jnp.int32))
    return x

  def _cached_blocks(self, x, positions, cache: KVCache | PagedKVCache, pages: PageTable | None, from_start: bool):
    """The blocks, each writing its keys and values into its layer of the cache in place (the whole
    cache rides in the scan's carry, so a decode step copies none of it). No remat: nothing is
    differentiated here."""
    c = self.config
    if cache.k.shape[0] != c.num_layers:
      raise ValueError(f"the cache has {cache.k.shape[0]} layers, the model {c.num_layers}")
    windows = [c.layer_window(i) for i in range(c.num_layers)]
    if from_start:  # as in _blocks: a window as long as the chunk is no window, and stays static
      windows = [w if w < x.shape[1] else 0 for w in windows]
    k, v = cache.k, cache.v
    if not c.scan_layers:
      for i, (block, window) in enumerate(zip(self.layers, windows)):
        x, (k, v, *_) = block(x, positions=positions, segment_ids=None, sliding_window=window,
                              cache=(k, v, i, pages), from_start=from_start)
      return x, type(cache)(k, v)

    def block_fn(carry, block, layer, window):
      x, k, v = carry
      x, (k, v, *_) = block(x, positions=positions, segment_ids=None, sliding_window=window,
                            cache=(k, v, layer, pages), from_start=from_start)
      return x, k, v

    layers = jnp.arange(c.num_layers)
    if len(set(windows)) == 1:
      fn = lambda carry, block, layer: block_fn(carry, block, layer, windows[0])
      xs = (self.layers, layers)
    else:
      fn = block_fn
      xs = (self.layers, layers, jnp.asarray(windows, jnp.int32))
    x, k, v = nnx.scan(
        fn, in_axes=(nnx.Carry,) + (0,) * len(xs), out_axes=nnx.Carry,
        transform_metadata={nnx.PARTITION_NAME: "layers"},
    )((x, k, v), *xs)
    return x, type(cache)(k, v)

  def init_cache(self, batch_size: int, max_length: int) -> KVCache:
    """An empty cache of [L, B, K, S, H] zeros for decoding with this model."""
    return KVCache.create(self.config, batch_size, max_length)

  def logits(self, features: jax.Array, token_ids: jax.Array | None = None) -> jax.Array:
    """[B, T, D] final-normed features -> [B, T, V] float32 logits; with token_ids [V'], only those
    tokens' logits [B, T, V'] (a speculative draft's head over its frequent tokens, infer/speculative.py)."""
    c = self.config
    if c.tie_embeddings:
      table = self.embedding[...] if token_ids is None else self.embedding[...][token_ids]
      out = _output_projection("BTD,VD->BTV", features, table, np.dtype(c.compute_dtype))
    elif isinstance(self.lm_head, nnx.Module):  # a quantized head (model.quant)
      if token_ids is not None:
        raise ValueError("token_ids: this LM head is a module (quantized or adapted) that computes every token's logit")
      out = self.lm_head("BTD,DV->BTV", features, c.compute_dtype, preferred_element_type=jnp.float32)
    else:
      head = self.lm_head[...] if token_ids is None else self.lm_head[...][:, token_ids]
      out = _output_projection("BTD,DV->BTV", features, head, np.dtype(c.compute_dtype))
    if c.final_logit_softcap:
      out = c.final_logit_softcap * jnp.tanh(out / c.final_logit_softcap)
    return shard(out, BTV)

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache: KVCache | PagedKVCache | None = None,
               pages: PageTable | None = None):
    """[B, T] tokens -> [B, T, V] float32 logits; with a cache, (logits, updated cache)."""
    features, new_cache = self.features(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                                        pages=pages)
    logits = self.logits(features)
    return logits if cache is None else (logits, new_cache)


def unstacked(module: Transformer) -> Transformer:
  """A view of a scanned decoder (scan_layers=True) with its layers as a list of blocks, each
  holding its own layer's arrays (copies, made once); other modules are returned as they are.

  For decoding on a CPU: there XLA copies a layer's weights out of the stacked [L, ...] arrays at
  every step (the layer scan's dynamic slice, and a static slice alike) before multiplying by
  them, which doubles the memory traffic of a step that is bound by it (benchmarks/RESULTS.md,
  decode). Each block is the stacked Block's structure over one layer's slice, exactly what the
  layer scan hands its body, so adapters and quantized weights work unchanged.
  """
  c = module.config
  if not c.scan_layers:
    return module
  layers_def, layers_state = nnx.split(module.layers)
  view = nnx.merge(*nnx.split(module))  # new module objects over the same arrays
  view.layers = nnx.List([nnx.merge(layers_def, state) for state in _split_layers(layers_state, c.num_layers)])
  view.config = c.replace(scan_layers=False)
  return view


@functools.partial(jax.jit, static_argnums=1)
def _split_layers(state, num_layers: int) -> list:
  """[L, ...] arrays -> L states of one layer's arrays each; one program copies them all."""
  return [jax.tree.map(lambda x: x[i] if x.ndim and x.shape[0] == num_layers else x, state) for i in range(num_layers)]
