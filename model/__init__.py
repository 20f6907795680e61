"""Flax NNX decoder-only transformers; the open families are configurations of one decoder.

Dimension letters, used in einsum strings, shape comments and weight names across ingredients:
  B batch          T query length     S key/value length   D model width (embed)
  N query heads    K kv heads         G query heads per kv head (N // K)
  H head dim       F MLP width        V vocab              L layers

Public API: ModelConfig, get_preset, PRESETS, Transformer, param_count, non_embedding_param_count,
matmul_param_count, flops_per_token (training), forward_flops (inference),
and the modules `model.sharding` and `model.hf`.
"""

from model.config import (PRESETS, ModelConfig, flops_per_token, forward_flops, get_preset, matmul_param_count,
                          non_embedding_param_count, param_count)
from model.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer", "flops_per_token", "forward_flops", "get_preset",
           "matmul_param_count", "non_embedding_param_count", "param_count"]
