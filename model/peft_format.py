"""Hugging Face PEFT's adapter files <-> our LoRA and DoRA adapter modules (model/adapters.py).

A PEFT adapter directory holds `adapter_config.json` (a LoraConfig: r, lora_alpha, target_modules,
use_rslora, use_dora, ...) and `adapter_model.safetensors`, one tensor per adapted Linear and layer:

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight         [r, in]   our lora_a (*I, r)
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight         [out, r]  our lora_b (r, *O)
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector [out]     our lora_magnitude (*O)

with `in`/`out` our input/output axes flattened (as model/hf.py maps the weights). PEFT scales the
update by lora_alpha / r (use_rslora: lora_alpha / sqrt(r)), as we do. Our own `config.peft` dict
(the method, e.g. 'qlora' with its quantization settings, which PEFT's files cannot say) goes to a
third file, `ingredients_peft.json`, which PEFT ignores (a key in adapter_config.json would make
PEFT warn that the file needs a newer PEFT; safetensors writes header metadata in a random order).
Without it, the config is translated from adapter_config.json.
VeRA and QA-LoRA adapters have no PEFT LoRA equivalent here: only LoRA and DoRA (and QLoRA, a LoRA
over a quantized base) are written. Files written by PEFT >= 0.9 (use_dora) are read.
"""

import json
import math
import os
import secrets
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from model import adapters, projections, quant

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"  # PEFT's
INGREDIENTS_FILE = "ingredients_peft.json"  # ours: the config.peft the adapter was made with
_SUBLAYERS = {"attn": "self_attn", "mlp": "mlp"}  # our Block's sub-layer -> Hugging Face's
# Our adapter weight -> PEFT's key suffix, and one layer's shape in PEFT's layout.
_TENSORS = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def _peft_shape(adapter, attr: str) -> tuple[int, ...]:
  return {"lora_a": (adapter.rank, adapter.fan_in), "lora_b": (adapter.fan_out, adapter.rank),
          "lora_magnitude": (adapter.fan_out,)}[attr]


def _to_peft(adapter, attr: str, x: np.ndarray) -> np.ndarray:
  """One layer's adapter weight in PEFT's layout (torch Linear weights are [out, in])."""
  if attr == "lora_a":
    return np.ascontiguousarray(x.reshape(adapter.fan_in, adapter.rank).T)
  if attr == "lora_b":
    return np.ascontiguousarray(x.reshape(adapter.rank, adapter.fan_out).T)
  return np.ascontiguousarray(x.reshape(adapter.fan_out))


def _to_ours(adapter, attr: str, t: np.ndarray) -> np.ndarray:
  if attr == "lora_a":
    return t.T.reshape(*adapter.in_shape, adapter.rank)
  if attr == "lora_b":
    return t.T.reshape(adapter.rank, *adapter.out_shape)
  return t.reshape(adapter.out_shape)


def _weights(adapter) -> tuple[str, ...]:
  return ("lora_a", "lora_b") + (("lora_magnitude",) if adapter.use_dora else ())


# LoraConfig keys that change what the adapter computes, with the only value we take for each.
_NEUTRAL = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
            "modules_to_save": None, "layers_to_transform": None, "exclude_modules": None,
            "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "target_parameters": None,
            "trainable_token_indices": None, "alora_invocation_tokens": None, "megatron_config": None,
            "use_bdlora": None, "arrow_config": None, "kasa_config": None, "monteclora_config": None,
            "velora_config": None, "loftq_config": {}}
# Known keys that do not: bookkeeping, init-only options, and options read only with another one.
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
            "peft_version", "init_lora_weights", "eva_config", "corda_config", "lora_ga_config", "layers_pattern",
            "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying"}
_READ = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"}
# init_lora_weights values that also rewrite the base weights: the adapter fits a base we do not have.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _prefix(slot: projections.Slot, layer: int) -> str:
  return f"base_model.model.model.layers.{layer}.{_SUBLAYERS[projections.PROJECTIONS[slot.name][0]]}.{slot.name}"


def _adapted(module) -> list[tuple[projections.Slot, adapters.LoRA]]:
  """The (slot, adapter) pairs of the decoder `module`; an adapter PEFT's LoRA cannot hold is an error."""
  pairs = [(s, s.get()) for s in projections.slots(module) if isinstance(s.get(), adapters.Adapter)]
  for slot, adapter in pairs:
    if type(adapter) is not adapters.LoRA:
      raise ValueError(f"{slot.name} has a {type(adapter).__name__} adapter; PEFT's format covers LoRA and "
                       "DoRA (and QLoRA, a LoRA over a quantized base) here, not VeRA or QA-LoRA")
  return pairs


def _host(array) -> np.ndarray:
  if not array.is_fully_addressable:  # multi-host: every process joins the gather
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def ingredients_config(module) -> dict:
  """Our `config.peft` dict for the adapters of `module` (method lora, dora or qlora)."""
  pairs = _adapted(module)
  if not pairs:
    raise ValueError("the module has no adapters to save (model.peft.add_adapters adds them)")
  first = pairs[0][1]

  def hyper(a):
    return a.rank, a.scale, a.use_dora, a.dropout_rate, getattr(a, "alpha", None), getattr(a, "use_rslora", False)

  odd = [s.name for s, a in pairs if hyper(a) != hyper(first)]
  if odd:
    raise ValueError(f"the adapters of {sorted(set(odd))} differ from {pairs[0][0].name}'s in rank, scale, "
                     "DoRA or dropout; PEFT's rank_pattern/alpha_pattern are not written here")
  layers = {}
  for slot, _ in pairs:
    layers.setdefault(slot.name, set()).add(slot.layer)
  targets = [n for n in projections.PROJECTIONS if n in layers]
  if len({frozenset(v) for v in layers.values()}) != 1 or (
      not first.stacked and len(layers[targets[0]]) != module.config.num_layers):
    raise ValueError(f"adapters on some layers only ({layers}); PEFT's layers_to_transform is not written here")
  rslora = bool(getattr(first, "use_rslora", False))
  alpha = getattr(first, "alpha", None)
  alpha = float(alpha) if alpha is not None else first.scale * (math.sqrt(first.rank) if rslora else first.rank)
  out = dict(method="dora" if first.use_dora else "lora", rank=first.rank, alpha=alpha, dropout=first.dropout_rate,
             targets=",".join(targets), use_rslora=rslora)
  if isinstance(first.base, quant.QuantizedWeight) and not first.use_dora:
    meta = dict(first.base.meta)  # QuantizedArray's static fields
    out.update(method="qlora", quant_type=meta["scheme"], quant_bits=8 if meta["scheme"] == "int8" else 4,
               block_size=meta["block_size"], double_quant=bool(meta["double_quant"]),
               quant_head=isinstance(getattr(module, "lm_head", None), quant.QuantizedWeight))
  return out


def adapter_config(module) -> dict:
  """PEFT's adapter_config.json content (a LoraConfig) for the adapters of `module`."""
  ours = ingredients_config(module)
  alpha = ours["alpha"]
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "", "revision": None,
      "inference_mode": True, "r": ours["rank"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
      "lora_dropout": ours["dropout"], "target_modules": ours["targets"].split(","),
      "use_rslora": ours["use_rslora"], "use_dora": ours["method"] == "dora", "init_lora_weights": True,
      "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
      "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
  }


def adapter_tensors(module) -> dict[str, np.ndarray]:
  """The adapter weights of `module` under PEFT's key names, in PEFT's layout."""
  out = {}
  for slot, adapter in _adapted(module):
    for attr in _weights(adapter):
      value = _host(getattr(adapter, attr)[...])
      for i in range(adapter.num_layers) if adapter.stacked else [slot.layer]:
        out[f"{_prefix(slot, i)}.{_TENSORS[attr]}"] = _to_peft(adapter, attr, value[i] if adapter.stacked else value)
  return out


def _replace(file: Path, write) -> None:
  """Writes `file` under a temporary name beside it, then renames it into place."""
  tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
  try:
    write(str(tmp))
    os.replace(tmp, file)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write(path, config: dict, tensors: dict[str, np.ndarray], ingredients: dict | None = None) -> None:
  """Writes `config` and `tensors` as PEFT's two files in the directory `path` (created if need be),
  and `ingredients`, our config.peft dict, beside them (an old one is removed when it is None); each
  file atomically (temporary file, then rename), adapter_config.json last."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  _replace(path / WEIGHTS_FILE, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
  if ingredients is None:
    (path / INGREDIENTS_FILE).unlink(missing_ok=True)
  else:
    _replace(path / INGREDIENTS_FILE, lambda f: Path(f).write_text(json.dumps(ingredients, indent=2, sort_keys=True)))
  _replace(path / CONFIG_FILE, lambda f: Path(f).write_text(json.dumps(config, indent=2, sort_keys=True)))


def _empty(value) -> bool:
  return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def from_peft_config(config: dict, where: str = CONFIG_FILE) -> dict:
  """Our `config.peft` dict for PEFT's LoraConfig dict `config`; an option we cannot reproduce is a
  ValueError naming its key (and `where`, the file)."""
  def bad(key, why):
    raise ValueError(f"{where}: {key}={config.get(key)!r} {why}")

  if config.get("peft_type") != "LORA":
    bad("peft_type", "is not supported; only PEFT's LORA adapters (with or without use_dora) are read")
  for key, neutral in _NEUTRAL.items():
    if not _empty(config.get(key)) and config.get(key) != neutral:
      bad(key, f"is not supported (only {neutral!r})")
  unknown = sorted(k for k, v in config.items() if k not in _NEUTRAL.keys() | _IGNORED | _READ and not _empty(v))
  if unknown:
    raise ValueError(f"{where}: option(s) {unknown} are not known here; cannot tell whether the adapter uses them")
  init = config.get("init_lora_weights")
  if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
    bad("init_lora_weights", "also changes the base weights; convert the adapter to plain LoRA first "
        "(PEFT's path_initial_model_for_weight_conversion)")
  rank = config.get("r")
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    bad("r", "must be a positive int")
  if not isinstance(config.get("lora_alpha"), (int, float)) or isinstance(config.get("lora_alpha"), bool):
    bad("lora_alpha", "must be a number")
  targets = config.get("target_modules")
  if targets == "all-linear":
    targets = list(projections.PROJECTIONS)
  if isinstance(targets, str) or not targets:
    bad("target_modules", f"must be a list of module names from {list(projections.PROJECTIONS)} (or 'all-linear')")
  unknown = [t for t in targets if t not in projections.PROJECTIONS]
  if unknown:
    bad("target_modules", f"names {unknown}, not among the adapted projections {list(projections.PROJECTIONS)}")
  return dict(method="dora" if config.get("use_dora") else "lora", rank=rank, alpha=float(config["lora_alpha"]),
              dropout=float(config.get("lora_dropout") or 0.0),
              targets=",".join(n for n in projections.PROJECTIONS if n in targets),
              use_rslora=bool(config.get("use_rslora")))


def _same(a, b) -> bool:
  if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
  """(our `config.peft` dict, PEFT's tensors by key) from the adapter directory `path`. The config is
  ingredients_peft.json's when we wrote one (checked against adapter_config.json), else
  adapter_config.json's, translated (`from_peft_config`)."""
  path = Path(path)
  config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} does not exist; expected a PEFT adapter directory "
                            f"({CONFIG_FILE} and {WEIGHTS_FILE})")
  if not weights_file.exists():
    also = " (adapter_model.bin, a torch pickle, is not read: save with safe_serialization=True)" if (
        path / "adapter_model.bin").exists() else ""
    raise FileNotFoundError(f"{weights_file} does not exist{also}")
  config = _json(config_file)
  ours = from_peft_config(config, str(config_file))
  with safe_open(weights_file, framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if not (path / INGREDIENTS_FILE).exists():
    return ours, tensors
  stored = _json(path / INGREDIENTS_FILE)
  as_peft = dict(stored, method="lora" if stored.get("method") == "qlora" else stored.get("method"))
  differ = {k: (v, stored.get(k)) for k, v in ours.items() if not _same(v, as_peft.get(k))}
  if differ:
    raise ValueError(f"{config_file} disagrees with {path / INGREDIENTS_FILE} on {differ} "
                     f"({CONFIG_FILE}'s value first)")
  return stored, tensors


def _json(file: Path) -> dict:
  try:
    value = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{file} holds a {type(value).__name__}, not a JSON object")
  return value


def assign(module, tensors: dict[str, np.ndarray]) -> None:
  """Writes PEFT's `tensors` into the adapters of `module` (stacked or per-layer), in the dtype and
  placement of the arrays they replace. Every key must match an adapter weight, in shape, and every
  adapter weight must have its key; otherwise a ValueError names the key(s), and nothing is changed."""
  updates, used, missing = [], set(), []
  for slot, adapter in _adapted(module):
    for attr in _weights(adapter):
      variable = getattr(adapter, attr)
      current = variable.get_value()
      host = np.empty(current.shape, current.dtype)
      for i in range(adapter.num_layers) if adapter.stacked else [slot.layer]:
        key = f"{_prefix(slot, i)}.{_TENSORS[attr]}"
        if key not in tensors:
          missing.append(key)
          continue
        used.add(key)
        tensor, want = np.asarray(tensors[key]), _peft_shape(adapter, attr)
        if tensor.shape != want:
          raise ValueError(f"tensor {key} has shape {tensor.shape}; the {slot.name} adapter (rank {adapter.rank}, "
                           f"{adapter.fan_in} -> {adapter.fan_out} features) needs {want}")
        host[i if adapter.stacked else ...] = _to_ours(adapter, attr, tensor)
      updates.append((variable, host, current.sharding))
  unexpected = sorted(set(tensors) - used)
  if missing or unexpected:
    raise ValueError(f"the adapter tensors do not match the module's adapters: missing {_few(missing)}, "
                     f"unexpected {_few(unexpected)}")
  for variable, host, sharding in updates:
    variable.set_value(jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index]))


def _few(keys: list[str], n: int = 6) -> str:
  return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"
