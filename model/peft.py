"""Parameter-efficient fine-tuning: adapters on the decoder's projections, and a quantized base.

  module = model.peft.add_adapters(module, config.peft, rngs=nnx.Rngs(0))   # in place; returns it
  merged = model.peft.merge(module)          # a plain module (QA-LoRA: a quantized one)
  model.peft.save_adapter(module, "adapter/")  # Hugging Face PEFT's format (model/peft_format.py)

`config.peft` keys (defaults in `DEFAULTS`):
  method        none | lora | dora | vera | qlora | qa_lora
  rank, alpha   r and alpha; the update is scaled by alpha / r (use_rslora: alpha / sqrt(r));
                VeRA has no scale (its b vector is the scale)
  dropout       dropout on the adapter's input (training steps only)
  targets       Hugging Face module names, comma-separated, or 'all' (PROJECTIONS' seven)
  vera_d_init   VeRA's initial d
  vera_seed     the seed VeRA's frozen random pair is regenerated from (PEFT's projection_prng_key)
  quant_bits, quant_type, block_size, double_quant   QLoRA's base: every projection quantized
                (nf4 | int4 are 4-bit, int8 is 8-bit; double_quant for nf4 only)
  group_size    QA-LoRA's groups: the base is group-wise int4 with this group size
  quant_head    qlora / qa_lora: quantize the untied output head too (QLoRA keeps it in 16 bits; at
                Llama 3's 128k vocabulary it is an eighth of an 8B model)
  modules_to_save  base parameters trained in full beside the adapters, comma-separated, of
                SAVABLE_MODULES: LongLoRA (Chen et al. 2023) trains 'embedding,norms' for long
                context, as Hugging Face PEFT's modules_to_save does; '' (default): none. They
                live in the run's checkpoints; `save_adapter` writes the adapters only, so export
                such a run merged (`merge`, then `model.hf.save_pretrained`)
The adapter modules are in model/adapters.py. Only adapter weights (ADAPTER_NAMES) and
modules_to_save train; the rest of the base is frozen, and `without_adapters(module)` is the base
alone, the frozen reference.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from model import adapters, peft_format, projections, quant, sharding
from model.adapters import QALoRA, VeRA, LoRA

METHODS = ("none", "lora", "dora", "vera", "qlora", "qa_lora")
QUANT_TYPES = {"nf4": 4, "int4": 4, "int8": 8}  # quant_type -> its bits
ADAPTER_NAMES = ("lora_a", "lora_b", "lora_magnitude", "vera_d", "vera_b")
# modules_to_save values: the token embedding, the untied output head, every norm's scale (and bias).
SAVABLE_MODULES = ("embedding", "lm_head", "norms")
DEFAULTS = dict(method="none", rank=8, alpha=16.0, dropout=0.0, targets="q_proj,v_proj", use_rslora=False,
                vera_d_init=0.1, vera_seed=0, quant_bits=4, quant_type="nf4", block_size=64, double_quant=True, group_size=32,
                quant_head=False, modules_to_save="")


def config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.peft` with its defaults (method 'none': full fine-tuning)."""
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.peft has unknown key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
  return ml_collections.ConfigDict({**DEFAULTS, **overrides})


@dataclasses.dataclass(frozen=True)
class Settings:
  """A checked `config.peft`."""

  method: str
  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]
  use_rslora: bool
  vera_d_init: float
  vera_seed: int
  quant_bits: int
  quant_type: str
  block_size: int
  double_quant: bool
  group_size: int
  quant_head: bool
  modules_to_save: tuple[str, ...] = ()

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  @property
  def quantized_base(self) -> bool:
    return self.method in ("qlora", "qa_lora")


def _targets(value) -> tuple[str, ...]:
  names = [t.strip() for t in value.split(",")] if isinstance(value, str) else [str(t).strip() for t in value]
  names = [n for n in names if n]
  if names == ["all"]:
    return tuple(projections.PROJECTIONS)
  unknown = [n for n in names if n not in projections.PROJECTIONS]
  if unknown or not names:
    raise ValueError(f"config.peft.targets={value!r}: unknown module name(s) {unknown or value!r}; valid names: "
                     f"{', '.join(projections.PROJECTIONS)} (or 'all')")
  return tuple(dict.fromkeys(names))


def settings(peft_config) -> Settings:
  """A checked Settings from a `config.peft` block, a ConfigDict or a plain dict (missing keys take
  DEFAULTS); a bad value is a ValueError naming its key."""
  if isinstance(peft_config, Settings):
    return peft_config
  given = peft_config.to_dict() if isinstance(peft_config, ml_collections.ConfigDict) else dict(peft_config)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.peft has unknown key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
  c = {**DEFAULTS, **given}
  if c["method"] not in METHODS:
    raise ValueError(f"config.peft.method={c['method']!r} is not one of {METHODS}")
  for key in ("rank", "block_size", "group_size"):
    if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] <= 0:
      raise ValueError(f"config.peft.{key}={c[key]!r} must be a positive int")
  if not 0 <= c["dropout"] < 1:
    raise ValueError(f"config.peft.dropout={c['dropout']} must be in [0, 1)")
  if c["quant_type"] not in QUANT_TYPES:
    raise ValueError(f"config.peft.quant_type={c['quant_type']!r} is not one of {tuple(QUANT_TYPES)}")
  if c["quant_bits"] not in (4, 8):
    raise ValueError(f"config.peft.quant_bits={c['quant_bits']!r} must be 4 or 8")
  if c["method"] == "qlora" and QUANT_TYPES[c["quant_type"]] != c["quant_bits"]:
    raise ValueError(f"config.peft.quant_bits={c['quant_bits']} does not match config.peft.quant_type="
                     f"{c['quant_type']!r} ({QUANT_TYPES[c['quant_type']]}-bit); for an 8-bit base set quant_type=int8")
  if c["method"] == "qa_lora" and c["quant_bits"] != 4:
    raise ValueError(f"config.peft.quant_bits={c['quant_bits']}: QA-LoRA's base here is group-wise int4 (quant_bits=4)")
  modules = tuple(m.strip() for m in str(c["modules_to_save"]).split(",") if m.strip())
  unknown = [m for m in modules if m not in SAVABLE_MODULES]
  if unknown:
    raise ValueError(f"config.peft.modules_to_save={c['modules_to_save']!r}: {unknown} not among {SAVABLE_MODULES}")
  return Settings(method=c["method"], rank=int(c["rank"]), alpha=float(c["alpha"]), dropout=float(c["dropout"]),
                  targets=_targets(c["targets"]), use_rslora=bool(c["use_rslora"]),
                  vera_d_init=float(c["vera_d_init"]), vera_seed=int(c["vera_seed"]), quant_bits=int(c["quant_bits"]), quant_type=c["quant_type"],
                  block_size=int(c["block_size"]), double_quant=bool(c["double_quant"]),
                  group_size=int(c["group_size"]), quant_head=bool(c["quant_head"]), modules_to_save=modules)


def adapter_modules(module: nnx.Module) -> list[adapters.Adapter]:
  return [m for _, m in nnx.iter_modules(module) if isinstance(m, adapters.Adapter)]


def has_adapters(module: nnx.Module) -> bool:
  return bool(adapter_modules(module))


def is_adapter_param(path, value) -> bool:
  """nnx filter: the adapter weights, the only parameters a PEFT run trains."""
  return isinstance(value, nnx.Param) and bool(path) and str(path[-1]) in ADAPTER_NAMES


def is_saved_module_param(path, modules: tuple[str, ...]) -> bool:
  """Whether the parameter at `path` belongs to one of `modules` (config.peft.modules_to_save)."""
  names = [str(p) for p in path]
  return (("embedding" in modules and "embedding" in names) or ("lm_head" in modules and "lm_head" in names)
          or ("norms" in modules and any(n == "norm" or n.endswith("_norm") for n in names)))


def _fan(slot: projections.Slot) -> tuple[int, int]:
  weight = slot.get()
  lead = 1 if slot.stacked else 0
  shape = weight.shape if isinstance(weight, quant.QuantizedWeight) else tuple(weight.shape[lead:])
  return math.prod(shape[: slot.in_rank]), math.prod(shape[slot.in_rank:])


def add_adapters(module: nnx.Module, peft_config, *, rngs: nnx.Rngs) -> nnx.Module:
  """Adds `peft_config`'s adapters to the decoder `module` in place (and returns it): for qlora and
  qa_lora, first quantizes every projection weight (the base); then wraps each target projection
  in its adapter. With a mesh in `model.sharding.axis_rules`, the new arrays are placed on it."""
  s = settings(peft_config)
  if s.method == "none":
    return module
  if has_adapters(module):
    raise ValueError("the module already has adapters; merge them (model.peft.merge) before adding others")
  if s.quantized_base and quant.is_quantized(module):
    raise ValueError(f"config.peft.method={s.method!r} quantizes the base itself, but the module is already "
                     "quantized; start from its float weights")
  targets = [slot for slot in projections.slots(module, s.targets)]
  for slot in targets:
    fan_in, _ = _fan(slot)
    if s.method == "qa_lora" and fan_in % s.group_size:
      raise ValueError(f"config.peft.group_size={s.group_size} does not divide the {fan_in} input features (d_in) "
                       f"of {slot.name}")
  if s.quantized_base:
    scheme = "int4" if s.method == "qa_lora" else s.quant_type
    block = s.group_size if s.method == "qa_lora" else s.block_size
    quant.quantize_projections(module, scheme, block_size=block, double_quant=s.double_quant and scheme == "nf4",
                               head=s.quant_head)
  common = {}
  if s.method == "vera":
    fans = [_fan(slot) for slot in targets]
    common = dict(projection_seed=s.vera_seed, max_in=max(f[0] for f in fans), max_out=max(f[1] for f in fans))
  for slot in targets:
    base = slot.get()
    axes = base.logical_axes if isinstance(base, quant.QuantizedWeight) else sharding.variable_logical_axes(base)
    geometry = dict(in_rank=slot.in_rank, stacked=slot.stacked, dropout=s.dropout, rngs=rngs)
    if s.method == "vera":
      adapter = VeRA(base, axes, rank=s.rank, d_init=s.vera_d_init, **common, **geometry)
    elif s.method == "qa_lora":
      adapter = QALoRA(base, axes, rank=s.rank, scale=s.scale, group_size=s.group_size, **geometry)
    else:
      adapter = LoRA(base, axes, rank=s.rank, scale=s.scale, use_dora=s.method == "dora", alpha=s.alpha,
                     use_rslora=s.use_rslora, **geometry)
    slot.set(adapter)
  sharding.place_in_context(module)
  return module


def without_adapters(module: nnx.Module) -> nnx.Module:
  """A view of `module` with every adapter switched off: the base alone (DPO's reference, PPO and
  GRPO's KL anchor), sharing the base's arrays rather than copying them."""
  view = projections.shallow_copy(module)
  for adapter in adapter_modules(view):
    adapter.enabled = False
  return view


def with_dropout(module: nnx.Module, rng: jax.Array) -> nnx.Module:
  """Turns adapter dropout on in `module` (a training step's freshly merged model), with keys from
  `rng`: one per adapter and layer. A no-op without dropout."""
  for i, adapter in enumerate(m for m in adapter_modules(module) if m.dropout_rate > 0):
    key = jax.random.fold_in(rng, i)
    if adapter.stacked:
      key = jax.random.split(key, adapter.num_layers)
    adapter.dropout_key.set_value(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
    adapter.dropout_on = True
  return module


def merge(module: nnx.Module) -> nnx.Module:
  """A copy of `module` with every adapter folded into its weight: a plain float module (a QLoRA
  base, adapted or not, is dequantized to the dtype it was quantized from), or for QA-LoRA the int4 base with the
  update folded into its zero points, exactly. The input is left as it was; with a mesh in
  `model.sharding.axis_rules`, the merged weights are placed on it."""
  module = projections.shallow_copy(module)
  qlora = any(isinstance(a, LoRA) and isinstance(a.base, quant.QuantizedWeight) for a in adapter_modules(module))
  for _, parent in list(nnx.iter_modules(module)):
    for attr, child in list(vars(parent).items()):
      if isinstance(child, adapters.Adapter):
        setattr(parent, attr, _merged(child))
  if qlora:  # the projections without adapters (and a quantized head) become float too
    quant.dequantize_all(module)
  sharding.place_in_context(module)
  return module


def _per_layer(adapter: adapters.Adapter, fn):
  """fn(one layer's adapter) for each layer, stacked, when the adapter is stacked."""
  if adapter.stacked:
    return nnx.vmap(fn, in_axes=0, out_axes=0)(adapter)
  return fn(adapter)


def _zero_shift(adapter):
  return adapter.zero_shift()


def _merged_weight(adapter):
  return adapter.merged_weight(jnp.float32)


def _merged(adapter: adapters.Adapter):
  axes = adapter.layer_axes + adapter.in_axes + adapter.out_axes
  if isinstance(adapter, QALoRA):
    base = adapter.base
    base.zero.set_value(base.zero[...] + nnx.jit(_per_layer, static_argnums=1)(adapter, _zero_shift))
    return base
  dtype = adapter.base.float_dtype if isinstance(adapter.base, quant.QuantizedWeight) else adapter.base.dtype
  weight = nnx.jit(_per_layer, static_argnums=1)(adapter, _merged_weight).astype(dtype)
  return nnx.Param(weight, out_sharding=axes, eager_sharding=False)


def trainable_count(module: nnx.Module) -> int:
  """Adapter parameters in `module` (every layer's)."""
  state = nnx.state(module, is_adapter_param)
  return sum(x.size for x in jax.tree.leaves(state))



def save_adapter(module: nnx.Module, path) -> None:
  """Writes the LoRA or DoRA adapters of `module` (QLoRA's too) to the directory `path` in Hugging
  Face PEFT's format (model/peft_format.py): `adapter_config.json` and `adapter_model.safetensors`,
  which `peft.PeftModel.from_pretrained(base, path)` loads onto the Hugging Face base model to give
  this module's logits; beside them `ingredients_peft.json`, our `config.peft` (the method and, for
  QLoRA, the base's quantization), which PEFT ignores and `load_adapter` reads. VeRA and QA-LoRA
  adapters are a ValueError. On several hosts every process joins the gathers and process 0 writes."""
  config, ours = peft_format.adapter_config(module), peft_format.ingredients_config(module)
  tensors = peft_format.adapter_tensors(module)
  if jax.process_index() == 0:
    peft_format.write(path, config, tensors, ours)


def load_adapter(module: nnx.Module, path) -> nnx.Module:
  """Loads the PEFT LoRA or DoRA adapter in the directory `path` (written by PEFT's save_pretrained
  or by `save_adapter`) into the decoder `module`, in place, and returns it. A module without
  adapters first gets them (`add_adapters` with the directory's config: ingredients_peft.json when
  `save_adapter` wrote it, else translated from adapter_config.json); a module with adapters must
  have the directory's (rank, scale, targets, DoRA or not). Unsupported PEFT options, missing or
  unexpected tensors and wrong shapes are ValueErrors naming them, a missing file is a
  FileNotFoundError; on an error the module is left as it was."""
  peft_config, tensors = peft_format.read(path)
  s = settings(peft_config)
  if not has_adapters(module):
    weights = [(slot, slot.get()) for slot in projections.slots(module)]
    try:
      add_adapters(module, peft_config, rngs=nnx.Rngs(0))
      peft_format.assign(module, tensors)
    except BaseException:  # leave the module as it was
      for slot, weight in weights:
        slot.set(weight)
      raise
    return module
  for adapter in adapter_modules(module):
    if not (type(adapter) is LoRA and adapter.rank == s.rank and adapter.use_dora == (s.method == "dora")
            and math.isclose(adapter.scale, s.scale, rel_tol=1e-6)):
      raise ValueError(f"the module's {type(adapter).__name__} adapters differ from the adapter at {path} "
                       f"(LoRA, rank {s.rank}, scale {s.scale:g}, DoRA {s.method == 'dora'}); load it into a "
                       "module without adapters")
  peft_format.assign(module, tensors)
  return module
