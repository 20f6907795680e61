"""Many LoRA adapters served at once over one base: every token names its adapter (0: none).

    served, names = model.multi_lora.stack(module, {"math": "adapters/math", "chat": "adapters/chat"})
    model.multi_lora.route(served, adapter_ids)   # inside the step: [B, T] int, 0 base, i names[i - 1]

For a projection W with n adapters (A_i: (I, r_i), B_i: (r_i, O), scale s_i), ranks padded to
r = max r_i, the adapters sit side by side as one rank-n*r pair, A = [A_1 .. A_n] and
B = [s_1 B_1; ..; s_n B_n], and a token of adapter i keeps only its own r columns of x A:

    y = W x + ((x A) * mask_i) B,   mask_i = 1 on columns (i-1) r .. i r - 1, 0 elsewhere (all 0 for 0)

which is that token's W x + s_i B_i(A_i x) exactly (the other columns contribute zeros), at n times
one adapter's low-rank cost: the way to batch a few adapters (S-LoRA and Punica gather per token
instead, worth it for hundreds). Adapters are PEFT-format LoRA directories (model.peft_format) of a
float base; DoRA, VeRA, QA-LoRA and QLoRA adapters are served merged (model.peft.merge), one per base.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from model import adapters, peft, peft_format, projections


class AdapterIds(nnx.Variable):
  """The adapter of each token of the current call ([B, T] int32, with a leading L when stacked)."""


class StackedLoRA(adapters.Adapter):
  """A projection with n LoRA adapters beside it, one chosen per token (`route`)."""

  def __init__(self, base, logical_axes, *, in_rank: int, stacked: bool, a, b, rank: int):
    super().__init__(base, logical_axes, in_rank=in_rank, stacked=stacked, dropout=0.0)
    self.rank, self.num_adapters = rank, a.shape[-1] // rank
    self.stacked_a = nnx.Variable(a)  # [(L,) *I, n r]
    self.stacked_b = nnx.Variable(b)  # [(L,) n r, *O], scales folded in
    self.token_adapters = AdapterIds(jnp.zeros(self.lead_shape + (1, 1), jnp.int32))

  def adapted(self, eq, x, base_out, dtype):
    x_letters, w_in, w_out, out = projections.split_equation(eq, self.in_rank)
    hidden = x_letters[: len(x_letters) - self.in_rank] + "r"  # 'BTr'
    h = jnp.einsum(f"{x_letters},{w_in}r->{hidden}", x, self.stacked_a[...].astype(dtype))
    column_adapter = jnp.arange(self.num_adapters * self.rank) // self.rank + 1  # [n r]: 1 .. n
    mask = self.token_adapters[...][..., None] == column_adapter  # [B, T, n r]
    h = jnp.where(mask, h, 0).astype(dtype)
    return base_out + jnp.einsum(f"{hidden},r{w_out}->{out}", h, self.stacked_b[...].astype(dtype))


def stack(module: nnx.Module, paths: Mapping[str, str]) -> tuple[nnx.Module, tuple[str, ...]]:
  """(a copy of `module` serving the LoRA adapters in `paths` (name -> PEFT directory), their names
  in id order: names[i] is adapter id i + 1). The input module is left as it is."""
  if not paths:
    raise ValueError("stack needs at least one adapter (name -> directory)")
  if peft.has_adapters(module):
    raise ValueError("the base module already has adapters; serve a merged module (model.peft.merge)")
  names = tuple(paths)
  loaded = {}  # slot key -> [(adapter index, LoRA)]
  for index, name in enumerate(names):
    copy = peft.load_adapter(projections.shallow_copy(module), paths[name])
    for slot in projections.slots(copy):
      adapter = slot.get()
      if not isinstance(adapter, adapters.Adapter):
        continue
      if type(adapter) is not adapters.LoRA or adapter.use_dora or not isinstance(adapter.base, nnx.Param):
        raise ValueError(f"adapter {name!r} ({paths[name]}) is not a LoRA over a float base; DoRA, VeRA, "
                         "QA-LoRA and QLoRA adapters are served merged (model.peft.merge), one per base")
      loaded.setdefault((slot.name, slot.layer), []).append((index, adapter))
  served = projections.shallow_copy(module)
  for slot in projections.slots(served):
    entries = loaded.get((slot.name, slot.layer))
    if entries:
      slot.set(_stacked(slot, entries, len(names)))
  return served, names


def _stacked(slot, entries, count: int) -> StackedLoRA:
  first = entries[0][1]
  rank = max(adapter.rank for _, adapter in entries)
  lead = first.lead_shape
  a = jnp.zeros(lead + first.in_shape + (count, rank), jnp.float32)
  b = jnp.zeros(lead + (count, rank) + first.out_shape, jnp.float32)
  in_axes = len(lead) + len(first.in_shape)
  for index, adapter in entries:
    a = a.at[(..., index, slice(0, adapter.rank))].set(adapter.lora_a[...])
    b_index = (slice(None),) * len(lead) + (index, slice(0, adapter.rank))
    b = b.at[b_index].set(adapter.scale * adapter.lora_b[...])
  a = a.reshape(a.shape[:in_axes] + (count * rank,))
  b = b.reshape(lead + (count * rank,) + first.out_shape)
  return StackedLoRA(first.base, first.layer_axes + first.in_axes + first.out_axes, in_rank=slot.in_rank,
                     stacked=slot.stacked, a=a, b=b, rank=rank)


def route(module: nnx.Module, adapter_ids: jax.Array) -> nnx.Module:
  """Points every stacked projection of `module` at the tokens' adapters ([B, T] int: 0 the base,
  i the adapter names[i - 1]); call on the merged module inside the jitted step. Returns it."""
  for _, child in nnx.iter_modules(module):
    if isinstance(child, StackedLoRA):
      child.token_adapters.set_value(jnp.broadcast_to(adapter_ids, child.lead_shape + adapter_ids.shape))
  return module


def is_served(module: nnx.Module) -> bool:
  return any(isinstance(m, StackedLoRA) for _, m in nnx.iter_modules(module))


__all__ = ["AdapterIds", "StackedLoRA", "is_served", "peft_format", "route", "stack"]
