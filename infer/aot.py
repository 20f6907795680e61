"""Generation's programs as ahead-of-time compilation lowers them (`python -m train.aot --job=decode`).

The prefill of a [B, T] batch of prompts and one decode step after it, `infer.decoding.prefill`
and `infer.decoding.decode` exactly as `infer.generate` jits them, lowered against abstract
parameters (ShapeDtypeStructs with shardings) on any mesh, a TPU slice's compile-only devices
included. Nothing is allocated.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import model as model_lib
from infer import decoding
from infer.sampling import Sampling
from model import sharding


@dataclasses.dataclass
class Lowerable:
  """One program: `lower()` gives (its jax Lowered, {memory category: the abstract arrays of it
  among the arguments}) inside the mesh's axis rules; the rest says what it does."""
  name: str
  lower: Callable[[], tuple[Any, dict[str, Any]]]
  model_flops: float  # the model's own flops in one call, all devices
  tokens: int
  repeats: int = 1  # calls per step of the job
  on_compiled: Callable[[Any], None] | None = None  # given the compiled executable, if compiled


def forward_flops(config: model_lib.ModelConfig, tokens: int, context: int) -> float:
  """Forward flops of `tokens` tokens each attending over `context` (a third of training's 6N + 12LNHT)."""
  return model_lib.flops_per_token(config, context) / 3 * tokens


def decode_programs(graphdef, params, model_config: model_lib.ModelConfig, mesh, rules, *, batch_size: int,
                    prompt_len: int, max_new_tokens: int, sampling: Sampling = Sampling()) -> list[Lowerable]:
  """[prefill, one decode step] for `batch_size` prompts of `prompt_len` tokens on `mesh`."""
  rules = sharding.with_default_rules(rules)
  static = dict(sampling=sampling, stop_tokens=(), controller=None, mesh=mesh, rules=rules)
  buffer = decoding.bucket(max_new_tokens)
  cache_length = prompt_len + buffer
  rows = NamedSharding(mesh, sharding.logical_to_spec(("activation_batch", None), (batch_size, prompt_len), mesh, rules))
  replicated = NamedSharding(mesh, PartitionSpec())
  tokens = jax.ShapeDtypeStruct((batch_size, prompt_len), jnp.int32, sharding=rows)
  lengths = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=replicated)
  key_shape = jax.eval_shape(lambda: decoding.row_keys(0, batch_size))
  keys = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=replicated)
  lower_prefill = functools.partial(decoding.prefill.lower, graphdef, params, tokens, lengths, keys, max_new_tokens,
                                    buffer=buffer, cache_length=cache_length, **static)

  prefill_outputs = []  # the compiled prefill's (out_info, output_shardings), once compiled

  def prefill():
    return lower_prefill(), {"parameters": params, "prompts": tokens}

  def decode_step():
    # The decode state is placed as the compiled prefill leaves it (compiled here only when the
    # job did not compile the prefill first).
    if not prefill_outputs:
      keep_prefill_outputs(lower_prefill().compile())
    out_info, output_shardings = prefill_outputs[-1]
    state = jax.tree.map(lambda s, placed: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed),
                         out_info, output_shardings)
    return (decoding.decode.lower(graphdef, params, state, max_new_tokens, 1, **static),
            {"parameters": params, "KV cache and decode state": state})

  def keep_prefill_outputs(compiled):
    prefill_outputs.append((compiled.out_info, compiled.output_shardings))

  return [
      Lowerable("prefill", prefill, forward_flops(model_config, batch_size * prompt_len, prompt_len),
                batch_size * prompt_len, on_compiled=keep_prefill_outputs),
      Lowerable("decode step", decode_step, forward_flops(model_config, batch_size, cache_length), batch_size),
  ]
