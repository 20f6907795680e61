"""The decoder's layers: norm, attention, gated MLP, and the block that joins them.

Weights are named for their einsum letters (see model/__init__.py) and carry logical axis names;
they are stored in param_dtype and cast to the compute dtype where they are used. The seven
projections are multiplied through model.projections.project, so a quantized weight or one with an
adapter (model.quant, model.peft) can stand in for a parameter.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from model import attention_ops, positional
from model.attention_masks import BTKH, BTNH
from model.projections import project
from model.config import ModelConfig
from model.sharding import shard

BTD = ("activation_batch", "activation_length", "activation_embed")
BTF = ("activation_batch", "activation_length", "activation_mlp")


def param(rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig, init: str = "normal") -> nnx.Param:
  dtype = config.weight_dtype
  if init == "normal":
    value = config.init_std * jax.random.normal(rngs.params(), shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    raise ValueError(f"unknown init {init!r}")
  # eager_sharding=False: shardings are applied in one place (model.sharding), by rules.
  return nnx.Param(value, out_sharding=tuple(logical_axes), eager_sharding=False)


class Norm(nnx.Module):
  """RMSNorm, Gemma's RMSNorm (scale by 1 + w), or LayerNorm; computed in float32."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.kind, self.eps, self.dtype = config.norm, config.norm_eps, config.compute_dtype
    d = config.embed_dim
    self.scale = param(rngs, (d,), ("norm",), config, "zeros" if self.kind == "gemma_rms" else "ones")
    if self.kind == "layer":
      self.bias = param(rngs, (d,), ("norm",), config, "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
    x = x.astype(jnp.float32)
    scale = self.scale[...].astype(jnp.float32)
    if self.kind == "layer":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
      y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
      return (y * scale + self.bias[...].astype(jnp.float32)).astype(self.dtype)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    if self.kind == "gemma_rms":
      return (y * (1.0 + scale)).astype(self.dtype)
    # Llama casts the normalized activations to the compute dtype before scaling.
    return (y.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


class Attention(nnx.Module):
  """Multi-head attention with GQA/MQA, RoPE or ALiBi, sliding window and soft-cap."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    d, n, k, h = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    self.wq = param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), c)  # DNH
    self.wk = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), c)  # DKH
    self.wv = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), c)  # DKH
    self.wo = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), c)  # NHD
    if c.qkv_bias:
      self.bq = param(rngs, (n, h), ("q_heads", "head_dim"), c, "zeros")
      self.bk = param(rngs, (k, h), ("kv_heads", "head_dim"), c, "zeros")
      self.bv = param(rngs, (k, h), ("kv_heads", "head_dim"), c, "zeros")

  def __call__(
      self,
      x: jax.Array,  # [B, T, D]
      *,
      positions: jax.Array,  # [B, T]
      segment_ids: jax.Array | None,  # [B, T]
      sliding_window: int | jax.Array,
      cache: tuple | None = None,  # (k, v [L, B, K, S, H], this layer, None) or, paged, (k, v [L, P, bs, K, H], layer, PageTable)
      from_start: bool = False,  # with a dense cache: the chunk is positions and slots 0..T-1 of its rows
  ):
    """[B, T, D] -> [B, T, D]; with a cache, also the cache with this chunk's keys and values written.

    With a cache the T tokens sit at slots positions[:, 0] .. positions[:, 0] + T - 1 of their row
    (consecutive positions) in this layer, and attend to every earlier slot the mask allows.
    attention_ops.attention picks the path (S^2-Attn, the ring, a backend, the cache's).
    """
    c = self.config
    dtype = c.compute_dtype
    q = project("BTD,DNH->BTNH", x, self.wq, dtype)
    k = project("BTD,DKH->BTKH", x, self.wk, dtype)
    v = project("BTD,DKH->BTKH", x, self.wv, dtype)
    if c.qkv_bias:
      q, k, v = q + self.bq[...].astype(dtype), k + self.bk[...].astype(dtype), v + self.bv[...].astype(dtype)
    if c.position == "rope":
      inv_freq = positional.rope_inverse_frequencies(c, positions)  # static but for dynamic_ntk
      rope_scale = positional.rope_attention_factor(c)
      q = positional.apply_rope(q, positions, inv_freq, rope_scale)
      k = positional.apply_rope(k, positions, inv_freq, rope_scale)
    q, k, v = shard(q, BTNH), shard(k, BTKH), shard(v, BTKH)
    scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
    alibi = positional.alibi_slopes(c.num_heads) if c.position == "alibi" else None
    out, cache = attention_ops.attention(
        q, k, v, positions=positions, segment_ids=segment_ids, impl=c.attention_impl, scale=scale,
        sliding_window=sliding_window, logit_softcap=c.attn_logit_softcap, alibi_slopes=alibi,
        shifted_sparse_group=c.shifted_sparse_group, cache=cache, from_start=from_start,
    )
    out = project("BTNH,NHD->BTD", shard(out, BTNH), self.wo, dtype)
    return out if cache is None else (out, cache)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with gelu_tanh."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.w_gate = param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c)  # DF
    self.w_up = param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c)  # DF
    self.w_down = param(rngs, (c.mlp_dim, c.embed_dim), ("mlp", "embed"), c)  # FD

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
    dtype = self.config.compute_dtype
    gate = project("BTD,DF->BTF", x, self.w_gate, dtype)
    up = project("BTD,DF->BTF", x, self.w_up, dtype)
    hidden = shard(_ACTIVATIONS[self.config.mlp_activation](gate) * up, BTF)
    return project("BTF,FD->BTD", hidden, self.w_down, dtype)


class Block(nnx.Module):
  """Pre-norm residual block; with post_norms (Gemma 2) the sublayer outputs are normed too."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.post_norms = config.post_norms
    self.attn_norm = Norm(config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = Norm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)
    if config.post_norms:
      self.attn_post_norm = Norm(config, rngs=rngs)
      self.mlp_post_norm = Norm(config, rngs=rngs)

  def __call__(self, x, *, positions, segment_ids, sliding_window, cache=None, from_start=False):  # x: [B, T, D]
    h = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids, sliding_window=sliding_window,
                  cache=cache, from_start=from_start)
    if cache is not None:
      h, cache = h
    if self.post_norms:
      h = self.attn_post_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.post_norms:
      h = self.mlp_post_norm(h)
    x = shard(x + h, BTD)
    return x if cache is None else (x, cache)
