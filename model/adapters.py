"""Adapter modules: a projection weight with a low-rank update beside it (LoRA, DoRA, VeRA, QA-LoRA).

Each module takes the place of a projection parameter (model/projections.py) and keeps the
original under `base` (an nnx.Param, or a model.quant.QuantizedWeight for QLoRA and QA-LoRA). The
base is frozen by the trainer's filter; the adapter's own weights are nnx.Params with the names
model.peft.ADAPTER_NAMES. With the weight's input axes I (`D`, or `NH` for o_proj) and output axes
O (`NH`, `KH`, `F` or `D`), r the rank and s the scale:

  LoRA     y = W x + s * B(A(dropout(x))),     A: (I, r) Kaiming-uniform as PEFT, B: (r, O) zeros.
  DoRA     y = m / ||W + s B A|| * (W x + s B A x)   (Liu et al. 2024, as PEFT computes it: the norm
           over the input axes per output, treated as a constant in the backward pass; with
           dropout, W x + (m / ||.|| - 1) W x' + m / ||.|| s B A x', x' = dropout(x)).
  VeRA     y = W x + b * (B(d * (A x'))): A: (r, max_in), B: (max_out, r), one frozen random pair
           for the whole model (sliced to each weight's size, as PEFT does), regenerated from
           `projection_seed` on every call, never stored; d: (r,) and b: (O,) trained.
  QA-LoRA  y = W_q x + s * B(A(pool(x'))): pool averages each group of `group_size` consecutive
           input features, the groups of W_q's int4 quantization, so s * B A is constant within a
           group and folds into the group's zero point exactly (`merged`).

Adapted modules hold a leading L axis on every array when their layers are scanned (`stacked`);
inside the layer scan they see one layer's. `enabled=False` gives the base alone (the frozen
reference of DPO/PPO/GRPO); `dropout_on` is set only for a training step (model.peft.with_dropout).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import projections, quant


class DropoutKey(nnx.Variable):
  """A raw PRNG key for one step's adapter dropout (set by model.peft.with_dropout), not trained."""


def kaiming_uniform(key, shape, fan_in: int, gain: float, dtype=jnp.float32) -> jax.Array:
  """U(-b, b) with b = gain * sqrt(3 / fan_in), torch's kaiming_uniform_."""
  bound = gain * math.sqrt(3.0 / fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _param(value, axes) -> nnx.Param:
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Adapter(nnx.Module):
  """What every adapter shares: the base weight, its geometry, dropout and the on/off switch."""

  def __init__(self, base, logical_axes, *, in_rank: int, stacked: bool, dropout: float):
    self.base = base
    self.in_rank, self.stacked, self.enabled = in_rank, stacked, True
    lead = 1 if stacked else 0
    shape = base.shape if isinstance(base, quant.QuantizedWeight) else tuple(base.shape[lead:])
    self.in_shape, self.out_shape = tuple(shape[:in_rank]), tuple(shape[in_rank:])
    self.num_layers = base_layers(base) if stacked else None
    axes = tuple(logical_axes) if logical_axes is not None else (None,) * (lead + len(shape))
    self.layer_axes, self.in_axes, self.out_axes = axes[:lead], axes[lead:lead + in_rank], axes[lead + in_rank:]
    self.dropout_rate, self.dropout_on = float(dropout), False
    if self.dropout_rate > 0:
      self.dropout_key = DropoutKey(jnp.zeros(self.lead_shape + (2,), jnp.uint32))

  @property
  def lead_shape(self) -> tuple[int, ...]:
    return (self.num_layers,) if self.stacked else ()

  @property
  def fan_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def fan_out(self) -> int:
    return math.prod(self.out_shape)

  def _init(self, key, shape, fan_in, gain=1.0 / math.sqrt(3.0)):
    """One layer's init, drawn per layer when stacked. The default gain is PEFT's LoRA A init,
    kaiming_uniform_(a=sqrt(5)): bound 1 / sqrt(fan_in)."""
    if self.stacked:
      return kaiming_uniform(key, self.lead_shape + tuple(shape), fan_in, gain)
    return kaiming_uniform(key, tuple(shape), fan_in, gain)

  def base_weight(self, dtype) -> jax.Array:
    """One layer's base weight, dense, in `dtype` (inside the layer scan)."""
    if isinstance(self.base, quant.QuantizedWeight):
      return self.base.dequantized(dtype)
    return self.base[...].astype(dtype)

  def dropout(self, x: jax.Array) -> jax.Array:
    if not (self.dropout_on and self.dropout_rate > 0):
      return x
    keep = 1.0 - self.dropout_rate
    mask = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)

  def base_projection(self, eq: str, x: jax.Array, dtype) -> jax.Array:
    """The frozen base's product: a quantized base decodes itself (rematerialized, see model.quant);
    a float one is cast inside a checkpoint, so the backward pass casts again rather than keeping
    every layer's cast copy of the base alive (the base has no gradient to need it for)."""
    if isinstance(self.base, quant.QuantizedWeight):
      return self.base(eq, x, dtype)
    return _frozen_einsum(eq, x, self.base[...], np.dtype(dtype))

  def __call__(self, eq: str, x: jax.Array, dtype) -> jax.Array:
    base_out = self.base_projection(eq, x, dtype)
    if not self.enabled:
      return base_out
    return self.adapted(eq, x, base_out, dtype)

  def adapted(self, eq, x, base_out, dtype):
    raise NotImplementedError


@functools.partial(jax.checkpoint, static_argnums=(0, 3), policy=jax.checkpoint_policies.nothing_saveable)
def _frozen_einsum(eq: str, x: jax.Array, weight: jax.Array, dtype) -> jax.Array:
  return projections.einsum_in_weight_order(eq, x, weight.astype(dtype))  # as the un-adapted layer does


def base_layers(base) -> int:
  value = base.codes[...] if isinstance(base, quant.QuantizedWeight) else base[...]
  return value.shape[0]


def dense_base(base, dtype) -> jax.Array:
  """The whole base weight, dense, in `dtype` (with its leading L axis when stacked)."""
  if isinstance(base, quant.QuantizedWeight):
    return base.dense(dtype)
  return base[...].astype(dtype)


def _low_rank(eq: str, in_rank: int, x, a, b, dtype):
  """B(A(x)) for A: (I, r), B: (r, O): two thin einsums ('BTD,Dr->BTr', 'BTr,rNH->BTNH')."""
  x_letters, w_in, w_out, out = projections.split_equation(eq, in_rank)
  hidden = x_letters[: len(x_letters) - in_rank] + "r"
  h = jnp.einsum(f"{x_letters},{w_in}r->{hidden}", x, a.astype(dtype))
  return jnp.einsum(f"{hidden},r{w_out}->{out}", h, b.astype(dtype))


def _dense_delta(a, b, in_rank: int):
  """A B as a dense (I, O) matrix (one layer's)."""
  in_letters = "abcd"[:in_rank]
  out_letters = "efgh"[: b.ndim - 1]
  return jnp.einsum(f"{in_letters}r,r{out_letters}->{in_letters}{out_letters}", a, b)


class LoRA(Adapter):
  """LoRA (Hu et al. 2021), and DoRA (Liu et al. 2024) with `use_dora`, on a float or quantized base."""

  def __init__(self, base, logical_axes, *, in_rank, stacked, rank: int, scale: float, dropout: float,
               use_dora: bool, rngs: nnx.Rngs, alpha: float | None = None, use_rslora: bool = False):
    super().__init__(base, logical_axes, in_rank=in_rank, stacked=stacked, dropout=dropout)
    self.rank, self.scale, self.use_dora = rank, float(scale), use_dora
    # How the scale was made (for PEFT's adapter_config.json): alpha / r, or alpha / sqrt(r).
    self.alpha, self.use_rslora = (None if alpha is None else float(alpha)), bool(use_rslora)
    self.lora_a = _param(self._init(rngs.params(), (*self.in_shape, rank), self.fan_in),
                         self.layer_axes + self.in_axes + (None,))
    self.lora_b = _param(jnp.zeros(self.lead_shape + (rank, *self.out_shape), jnp.float32),
                         self.layer_axes + (None,) + self.out_axes)
    if use_dora:
      # m starts at ||W|| per output (the update is zero), of every layer when stacked.
      # m starts at ||W|| per output (the update is zero), every layer's when stacked.
      norm = nnx.vmap(lambda a: a.weight_norm())(self) if stacked else self.weight_norm()
      self.lora_magnitude = _param(norm, self.layer_axes + self.out_axes)

  def delta(self) -> jax.Array:
    """s * A B, dense, one layer's (I, O) (float32)."""
    return self.scale * _dense_delta(self.lora_a[...], self.lora_b[...], self.in_rank)

  def weight_norm(self) -> jax.Array:
    """||W + s A B|| over the input axes, one per output (float32), one layer's."""
    return self._column_norm(self.base_weight(jnp.float32) + self.delta())

  def _column_norm(self, w: jax.Array) -> jax.Array:
    """||w|| over the input axes, one per output; a dot product, which XLA sums in the same order
    wherever it is compiled (a fused reduction may not)."""
    letters = "abcdefgh"[: w.ndim]
    out = letters[self.in_rank:]
    return jnp.sqrt(jnp.einsum(f"{letters},{letters}->{out}", w, w, precision=jax.lax.Precision.HIGHEST))

  def adapted(self, eq, x, base_out, dtype):
    x_dropped = self.dropout(x)
    lora_out = self.scale * _low_rank(eq, self.in_rank, x_dropped, self.lora_a[...], self.lora_b[...], dtype)
    if not self.use_dora:
      return base_out + lora_out
    # PEFT detaches the norm (DoRA sec. 4.3): it is a constant in the backward pass.
    ratio = self.lora_magnitude[...] / jax.lax.stop_gradient(self.weight_norm())
    # The norm compiled inside the layer scan may differ from the one m was initialised with in its
    # last bits; a ratio within float32 rounding of 1 is taken as 1 (its gradient kept), so that
    # with B = 0 the output is the base's exactly.
    snapped = jnp.where(jnp.abs(ratio - 1) <= 8 * jnp.finfo(jnp.float32).eps, 1.0, ratio)
    magnitude_scale = (ratio + jax.lax.stop_gradient(snapped - ratio)).astype(dtype)
    if x_dropped is x:
      return magnitude_scale * (base_out + lora_out)
    dropped_base = self.base_projection(eq, x_dropped, dtype)
    return base_out + (magnitude_scale - 1) * dropped_base + magnitude_scale * lora_out

  def merged_weight(self, dtype) -> jax.Array:
    """One layer's W + s A B (DoRA: times m / ||W + s A B||), dense, in `dtype`."""
    w = self.base_weight(jnp.float32) + self.delta()
    if self.use_dora:
      w = w * (self.lora_magnitude[...] / self.weight_norm())
    return w.astype(dtype)


class VeRA(Adapter):
  """VeRA (Kopiczko et al. 2024): dW = diag(b) B diag(d) A with A, B frozen, random and shared."""

  def __init__(self, base, logical_axes, *, in_rank, stacked, rank: int, d_init: float, dropout: float,
               projection_seed: int, max_in: int, max_out: int, rngs: nnx.Rngs):
    super().__init__(base, logical_axes, in_rank=in_rank, stacked=stacked, dropout=dropout)
    self.rank, self.projection_seed, self.max_in, self.max_out = rank, int(projection_seed), max_in, max_out
    self.vera_d = _param(jnp.full(self.lead_shape + (rank,), d_init, jnp.float32), self.layer_axes + (None,))
    self.vera_b = _param(jnp.zeros(self.lead_shape + self.out_shape, jnp.float32), self.layer_axes + self.out_axes)

  def projections(self) -> tuple[jax.Array, jax.Array]:
    """This weight's slices of the shared pair: A (I, r) and B (r, O) (float32)."""
    full_a, full_b = shared_projections(self.projection_seed, self.rank, self.max_in, self.max_out)
    a = full_a[:, : self.fan_in].T.reshape(*self.in_shape, self.rank)
    b = full_b[: self.fan_out, :].T.reshape(self.rank, *self.out_shape)
    return a, b

  def _scaled(self):
    a, b = self.projections()
    return a * self.vera_d[...], b * self.vera_b[...]  # diag(d) on A's rank axis, diag(b) on outputs

  def adapted(self, eq, x, base_out, dtype):
    a, b = self._scaled()
    return base_out + _low_rank(eq, self.in_rank, self.dropout(x), a, b, dtype)

  def merged_weight(self, dtype) -> jax.Array:
    a, b = self._scaled()
    return (self.base_weight(jnp.float32) + _dense_delta(a, b, self.in_rank)).astype(dtype)


def shared_projections(seed: int, rank: int, max_in: int, max_out: int) -> tuple[jax.Array, jax.Array]:
  """VeRA's frozen pair, A (r, max_in) and B (max_out, r), from `seed` alone: the same in every
  layer and every run that uses the seed. PEFT's init: kaiming_uniform with gain sqrt(2)."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(seed))
  return (kaiming_uniform(key_a, (rank, max_in), max_in, math.sqrt(2.0)),
          kaiming_uniform(key_b, (max_out, rank), rank, math.sqrt(2.0)))


class QALoRA(Adapter):
  """QA-LoRA (Xu et al. 2023) on a group-wise int4 base with groups of `group_size` input features."""

  def __init__(self, base, logical_axes, *, in_rank, stacked, rank: int, scale: float, dropout: float,
               group_size: int, rngs: nnx.Rngs):
    super().__init__(base, logical_axes, in_rank=in_rank, stacked=stacked, dropout=dropout)
    if not (isinstance(base, quant.QuantizedWeight) and base.scheme == "int4"
            and base.block_size == group_size):
      raise ValueError("QA-LoRA needs a group-wise int4 base quantized with block_size == group_size")
    self.rank, self.scale, self.group_size = rank, float(scale), group_size
    groups = self.fan_in // group_size
    first = self.in_axes[0] if self.in_axes else None
    self.lora_a = _param(self._init(rngs.params(), (groups, rank), groups), self.layer_axes + (first, None))
    self.lora_b = _param(jnp.zeros(self.lead_shape + (rank, *self.out_shape), jnp.float32),
                         self.layer_axes + (None,) + self.out_axes)

  def pooled(self, x: jax.Array) -> jax.Array:
    """[..., *I] -> [..., I / group_size]: the mean of each group of consecutive input features."""
    lead = x.shape[: x.ndim - self.in_rank]
    return jnp.mean(x.reshape(*lead, self.fan_in // self.group_size, self.group_size), axis=-1)

  def adapted(self, eq, x, base_out, dtype):
    x_letters, _, w_out, out = projections.split_equation(eq, self.in_rank)
    h = jnp.einsum("...g,gr->...r", self.pooled(self.dropout(x)), self.lora_a[...].astype(dtype))
    hidden = x_letters[: len(x_letters) - self.in_rank] + "r"
    return base_out + self.scale * jnp.einsum(f"{hidden},r{w_out}->{out}", h, self.lora_b[...].astype(dtype))

  def zero_shift(self) -> jax.Array:
    """s * A B / group_size per (group, output): what merging adds to each zero point (float32),
    shaped like the base's zero (G, 1, *O), one layer's."""
    shift = self.scale * jnp.einsum("gr,r...->g...", self.lora_a[...], self.lora_b[...]) / self.group_size
    return shift[:, None]
