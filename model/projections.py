"""The decoder's seven weight matrices that adapters and quantization replace, and the one call
that multiplies by any of them.

A projection weight is stored input axes first (`DNH`, `NHD`, `DF`, `FD`; see model/layers.py). A
layer multiplies by it with `project(eq, x, weight, dtype)`; the weight is an `nnx.Param`, or a
module that computes the product itself (a quantized weight, a weight with an adapter), so the
layers never need to know which.
"""

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

# Hugging Face module name -> (sub-layer of a Block, weight attribute, number of input axes).
PROJECTIONS: dict[str, tuple[str, str, int]] = {
    "q_proj": ("attn", "wq", 1),  # DNH
    "k_proj": ("attn", "wk", 1),  # DKH
    "v_proj": ("attn", "wv", 1),  # DKH
    "o_proj": ("attn", "wo", 2),  # NHD
    "gate_proj": ("mlp", "w_gate", 1),  # DF
    "up_proj": ("mlp", "w_up", 1),  # DF
    "down_proj": ("mlp", "w_down", 1),  # FD
}


def project(eq: str, x: jax.Array, weight, dtype) -> jax.Array:
  """einsum(eq, x, W) in `dtype`, for W a parameter or a module that multiplies by itself."""
  if isinstance(weight, nnx.Module):
    return weight(eq, x, dtype)
  return weight_einsum(eq, x, weight[...].astype(dtype))


def weight_einsum(eq: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
  """jnp.einsum(eq, x, w) whose backward pass is two einsums that name their outputs' letters in
  the order of x's and w's: dx = einsum(out, w -> x), dw = einsum(x, out -> w).

  The same products autodiff computes, in the same dtypes. Autodiff's transposed dot_general
  yields dW with its axes in another order and a transpose after it, and XLA:CPU fuses that
  transpose into the elementwise backward ops that produce the cotangent (a strided write
  through [B*T, F]): on the benchmark's MLP that made the backward pass 1.4x slower
  (benchmarks/RESULTS.md, train step). Every letter of x must appear in w or the output.
  """
  if x.dtype != w.dtype or (preferred_element_type is not None and preferred_element_type != x.dtype):
    return einsum_in_weight_order(eq, x, w, preferred_element_type=preferred_element_type)  # autodiff's rules
  return _weight_einsum(eq, x, w)


def einsum_in_weight_order(eq: str, x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
  """jnp.einsum(eq, x, w), contracting several letters (o_proj's 'NH') in the order w stores them.

  jnp.einsum orders a contraction's letters alphabetically ('HN'), and XLA:CPU then lays both
  operands out in that order: it copied every layer's [N, H, D] output weight into [H, N, D] at
  every decode step (30 us a layer on the quickstart model, 10% of its step). Renaming the
  letters in order of appearance, w's first, changes nothing else.
  """
  if "->" not in eq:  # without it einsum orders the output's letters alphabetically: renaming would reorder them
    raise ValueError(f"einsum_in_weight_order needs an explicit output ('...->...'), got {eq!r}")
  letters = dict.fromkeys(c for c in eq.split("->")[0].split(",")[1] + eq if c.isalpha())
  renamed = {c: chr(ord("a") + i) for i, c in enumerate(letters)}
  return jnp.einsum("".join(renamed.get(c, c) for c in eq), x, w, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _weight_einsum(eq, x, w):
  return einsum_in_weight_order(eq, x, w)


def _weight_einsum_fwd(eq, x, w):
  return einsum_in_weight_order(eq, x, w), (x, w)


def _weight_einsum_bwd(eq, residuals, dy):
  x, w = residuals
  operands, out = eq.split("->")
  x_letters, w_letters = operands.split(",")
  dx = jnp.einsum(f"{out},{w_letters}->{x_letters}", dy, w)
  dw = jnp.einsum(f"{x_letters},{out}->{w_letters}", x, dy)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_weight_einsum.defvjp(_weight_einsum_fwd, _weight_einsum_bwd)


def split_equation(eq: str, in_rank: int) -> tuple[str, str, str, str]:
  """'BTD,DNH->BTNH', 1 -> ('BTD', 'D', 'NH', 'BTNH'): x's letters, the weight's input and output
  letters, the result's letters."""
  inputs, out = eq.split("->")
  x_letters, w_letters = inputs.split(",")
  return x_letters, w_letters[:in_rank], w_letters[in_rank:], out


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one projection weight lives: `getattr(parent, attr)`, of every layer when `stacked`
  (scanned layers: one leading L axis), else of one layer."""

  parent: nnx.Module
  attr: str
  name: str  # the Hugging Face module name (q_proj, ...)
  layer: int | None  # None when stacked
  in_rank: int
  stacked: bool

  def get(self):
    return getattr(self.parent, self.attr)

  def set(self, value) -> None:
    setattr(self.parent, self.attr, value)


def slots(decoder, names=tuple(PROJECTIONS)) -> Iterator[Slot]:
  """The projection weights of `decoder` (a model.Transformer) named in `names`, layer by layer."""
  stacked = decoder.config.scan_layers
  blocks = [(None, decoder.layers)] if stacked else list(enumerate(decoder.layers))
  for layer, block in blocks:
    for name in names:
      sub, attr, in_rank = PROJECTIONS[name]
      yield Slot(getattr(block, sub), attr, name, layer, in_rank, stacked)


def shallow_copy(module: nnx.Module) -> nnx.Module:
  """A copy of `module` with new module and variable objects over the same arrays: replacing a
  weight in it, or changing a variable's value, leaves the original as it was (no array is copied)."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
