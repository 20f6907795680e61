"""ModelConfig: every architectural choice of the decoder as a field, plus named presets.

Families (Llama, Mistral, Qwen2, Gemma) are configurations of one decoder, not copies of it.
Scalar fields only, so that a config maps one-to-one onto an ml_collections dict and
every field can be overridden from the command line. "Off" is spelled 0 (sliding_window=0,
attn_logit_softcap=0.0), never None, for the same reason.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

NORMS = ("rms", "gemma_rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
POSITIONS = ("rope", "alibi", "none")
ROPE_SCALINGS = ("none", "linear", "llama3", "ntk", "dynamic_ntk", "yarn")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer. Letters: V vocab, D embed, L layers, N/K query/kv heads, H head dim, F mlp."""

  vocab_size: int = 256  # V
  embed_dim: int = 64  # D
  num_layers: int = 2  # L
  num_heads: int = 4  # N
  num_kv_heads: int = 2  # K: N for MHA, 1 for MQA, in between for GQA
  head_dim: int = 16  # H: may differ from D // N (Gemma)
  mlp_dim: int = 128  # F
  # The MLP is gated: down(act(gate(x)) * up(x)); silu gives SwiGLU, gelu_tanh gives GeGLU.
  mlp_activation: str = "silu"
  norm: str = "rms"  # rms, gemma_rms (scale by 1 + w), layer (LayerNorm with bias)
  norm_eps: float = 1e-5
  # Gemma 2's sandwich norms: extra norms on the outputs of attention and of the MLP.
  post_norms: bool = False
  position: str = "rope"  # rope, alibi, none
  rope_theta: float = 10_000.0
  rope_scaling: str = "none"  # none, linear, llama3, ntk, dynamic_ntk, yarn (model/positional.py)
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 scaling only
  rope_high_freq_factor: float = 4.0  # llama3 scaling only
  rope_original_max_len: int = 8192  # llama3 and yarn: the context length the model was trained at
  rope_yarn_beta_fast: float = 32.0  # yarn: rotations at which the ramp to interpolation starts ...
  rope_yarn_beta_slow: float = 1.0  # ... and ends
  rope_yarn_truncate: bool = True  # yarn: the ramp's ends rounded to whole dimensions (HF's `truncate`)
  rope_attention_factor: float = 0.0  # yarn: q and k scaled by it; 0 is the paper's 0.1 ln(factor) + 1
  # LongLoRA's S^2-Attn (model/attention_ops.py) in forward passes without a KV cache (training,
  # held-out loss): groups of this many positions, half the heads shifted by half a group; 0 is off.
  # Decoding with a cache attends fully; load with 0 to score with full attention.
  shifted_sparse_group: int = 0
  # Written to exported HF configs; dynamic_ntk's threshold: beyond it, the base grows with the length.
  max_position_embeddings: int = 2048
  # Query i sees key j only when i - w < j <= i; 0 means no window (Mistral convention).
  sliding_window: int = 0
  # Every n-th layer (1-based) attends globally, the rest use the window; 0 means every
  # layer uses sliding_window. Gemma 2 alternates: local, global, local, ... (n = 2).
  global_layer_every: int = 0
  attn_logit_softcap: float = 0.0  # c * tanh(logits / c) on attention logits; 0 is off
  final_logit_softcap: float = 0.0  # the same on the output logits (Gemma 2)
  # Queries are scaled by query_pre_attn_scalar ** -0.5; 0 means head_dim (Gemma 2 sets it).
  query_pre_attn_scalar: float = 0.0
  qkv_bias: bool = False  # Qwen2
  tie_embeddings: bool = False
  scale_embeddings: bool = False  # multiply embeddings by sqrt(D) (Gemma)
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype of activations
  param_dtype: str = "float32"
  attention_impl: str = "xla"  # xla (plain jnp, the reference), cudnn, pallas
  remat_policy: str = "none"  # none, full, dots, dots_no_batch
  scan_layers: bool = True  # one scanned block (fast compile) or L separate blocks

  def __post_init__(self):
    errors = []
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        errors.append(f"{name}={value!r} must be a positive int")
    for name, allowed in (
        ("mlp_activation", ACTIVATIONS),
        ("norm", NORMS),
        ("position", POSITIONS),
        ("rope_scaling", ROPE_SCALINGS),
        ("attention_impl", ATTENTION_IMPLS),
        ("remat_policy", REMAT_POLICIES),
        ("dtype", DTYPES),
        ("param_dtype", DTYPES),
    ):
      if getattr(self, name) not in allowed:
        errors.append(f"{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.shifted_sparse_group and (self.shifted_sparse_group < 2 or self.num_heads % 2
                                      or (self.num_kv_heads % 2 and self.num_kv_heads != 1)):
      errors.append(f"shifted_sparse_group={self.shifted_sparse_group} needs a group of >= 2 and heads that split in "
                    f"halves (num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}: even, or 1 kv head)")
    for name in ("sliding_window", "global_layer_every"):
      if getattr(self, name) < 0:
        errors.append(f"{name}={getattr(self, name)!r} must be >= 0 (0 is off)")
    for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar", "norm_eps"):
      if getattr(self, name) < 0:
        errors.append(f"{name}={getattr(self, name)!r} must be >= 0")
    if not errors and self.num_heads % self.num_kv_heads:
      errors.append(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
    if self.position == "rope" and self.head_dim % 2:
      errors.append(f"head_dim={self.head_dim} must be even for rope")
    if self.rope_scaling != "none" and self.rope_scaling_factor < 1.0:
      errors.append(f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1 with rope_scaling={self.rope_scaling!r}")
    if self.rope_scaling == "yarn" and self.rope_yarn_beta_fast <= self.rope_yarn_beta_slow:
      errors.append(f"rope_yarn_beta_fast={self.rope_yarn_beta_fast} must exceed rope_yarn_beta_slow={self.rope_yarn_beta_slow}")
    if self.rope_attention_factor < 0:
      errors.append(f"rope_attention_factor={self.rope_attention_factor} must be >= 0 (0: yarn's default)")
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      errors.append(
          f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed rope_low_freq_factor={self.rope_low_freq_factor}"
      )
    if self.global_layer_every and not self.sliding_window:
      errors.append(f"global_layer_every={self.global_layer_every} needs a sliding_window > 0")
    if errors:
      raise ValueError("Invalid ModelConfig: " + "; ".join(errors))

  @property
  def queries_per_kv_head(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def layer_window(self, layer: int) -> int:
    """The sliding window of layer `layer` (0-based), 0 for global attention."""
    if self.global_layer_every and (layer + 1) % self.global_layer_every == 0:
      return 0
    return self.sliding_window

  def replace(self, **overrides: Any) -> "ModelConfig":
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"Unknown ModelConfig field(s) {unknown}; known: {[f.name for f in dataclasses.fields(self)]}")
    return dataclasses.replace(self, **overrides)


_LLAMA = dict(norm="rms", mlp_activation="silu", position="rope")

PRESETS: dict[str, ModelConfig] = {
    # For tests and laptops: GQA (N=4, K=2), every code path, compiles in seconds.
    "tiny": ModelConfig(),
    "llama3.2-1b": ModelConfig(
        vocab_size=128_256, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        mlp_dim=8192, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling="llama3", rope_scaling_factor=32.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
        max_position_embeddings=131_072, tie_embeddings=True, **_LLAMA,
    ),
    "llama3.1-8b": ModelConfig(
        vocab_size=128_256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14_336, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling="llama3", rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
        max_position_embeddings=131_072, **_LLAMA,
    ),
    "llama3.1-70b": ModelConfig(
        vocab_size=128_256, embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
        mlp_dim=28_672, norm_eps=1e-5, rope_theta=500_000.0, rope_scaling="llama3", rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
        max_position_embeddings=131_072, **_LLAMA,
    ),
    "llama2-7b": ModelConfig(
        vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
        mlp_dim=11_008, norm_eps=1e-5, rope_theta=10_000.0, max_position_embeddings=4096, **_LLAMA,
    ),
    "mistral-7b": ModelConfig(
        vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14_336, norm_eps=1e-5, rope_theta=10_000.0, sliding_window=4096,
        max_position_embeddings=32_768, **_LLAMA,
    ),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151_936, embed_dim=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        mlp_dim=4864, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True,
        max_position_embeddings=32_768, **_LLAMA,
    ),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152_064, embed_dim=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
        mlp_dim=18_944, norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=False,
        max_position_embeddings=32_768, **_LLAMA,
    ),
    "gemma2-9b": ModelConfig(
        vocab_size=256_000, embed_dim=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256,
        mlp_dim=14_336, mlp_activation="gelu_tanh", norm="gemma_rms", norm_eps=1e-6, post_norms=True,
        position="rope", rope_theta=10_000.0, sliding_window=4096, global_layer_every=2, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, query_pre_attn_scalar=256.0, tie_embeddings=True, scale_embeddings=True,
        max_position_embeddings=8192,
    ),
    "gemma-2b": ModelConfig(
        vocab_size=256_000, embed_dim=2048, num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256,
        mlp_dim=16_384, mlp_activation="gelu_tanh", norm="gemma_rms", norm_eps=1e-6, position="rope",
        rope_theta=10_000.0, tie_embeddings=True, scale_embeddings=True, max_position_embeddings=8192,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  """The named preset, with any field replaced: get_preset('llama3.1-8b', num_layers=2)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def param_count(config: ModelConfig) -> int:
  """Number of parameters, from the config alone (no allocation)."""
  c = config
  norm_params = c.embed_dim * (2 if c.norm == "layer" else 1)  # LayerNorm has a bias
  attention = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  if c.qkv_bias:
    attention += c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
  mlp = 3 * c.embed_dim * c.mlp_dim
  norms_per_layer = 4 if c.post_norms else 2
  per_layer = attention + mlp + norms_per_layer * norm_params
  embeddings = c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
  return c.num_layers * per_layer + embeddings + norm_params


def non_embedding_param_count(config: ModelConfig) -> int:
  """Parameters less the token embedding and the output projection (Kaplan et al. 2020's N); norms stay in."""
  c = config
  return param_count(c) - c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)


def matmul_param_count(config: ModelConfig) -> int:
  """Parameters a token multiplies through: all but the embedding lookup and the norms (the output
  projection included, also when it is the tied embedding)."""
  c = config
  norm_params = c.embed_dim * (2 if c.norm == "layer" else 1)
  norms = (c.num_layers * (4 if c.post_norms else 2) + 1) * norm_params
  embedding_lookup = c.vocab_size * c.embed_dim if not c.tie_embeddings else 0
  return param_count(c) - norms - embedding_lookup


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), as in PaLM (Chowdhery et al. 2022, app. B).

  6 * matmul_param_count + 12 * L * N * H * T for attention scores and values, counted over the
  full T x T square (the causal half is not subtracted, as in PaLM's MFU).
  """
  c = config
  return 6.0 * matmul_param_count(c) + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


def forward_flops(config: ModelConfig, num_tokens):
  """Inference FLOPs of one sequence of `num_tokens` tokens (an int, or an array of them) read left
  to right with a KV cache: per token 2 * matmul_param_count, plus 4 * L * N * H * t for token t's
  attention scores and values over its t keys (the causal triangle: summed, 2 * L * N * H * n (n + 1)).

  A third of flops_per_token's matmul term (forward only); its attention term is the forward over the
  keys each token actually reads. A sliding window is not subtracted (nor is it in flops_per_token).
  """
  c = config
  return 2.0 * matmul_param_count(c) * num_tokens + 2.0 * c.num_layers * c.num_heads * c.head_dim * num_tokens * (
      num_tokens + 1)
