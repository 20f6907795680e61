"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, Gemma and Gemma 2 families.

`from_pretrained(path)` reads `config.json` and `*.safetensors` (one file or a sharded index) and
returns a Transformer. Loading streams: one checkpoint tensor at a time is read on the host,
converted to our layout, and handed to `jax.make_array_from_callback`, so each device receives
only its own shard and no whole-model copy exists anywhere. `save_pretrained(module, path)` writes
a directory that `transformers` loads back to the same logits.

Both transformers 4.x config keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x keys
(`rope_parameters`, `dtype`) are read; exports carry both spellings.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from model import positional
from model.config import ModelConfig
from model.sharding import DEFAULT_RULES, Rules, state_shardings
from model.transformer import Transformer

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
# transformers' own defaults where a config.json leaves the key out.
_TIED_BY_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma": True, "gemma2": True}
_ACTIVATIONS_FROM_HF = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
_ACTIVATIONS_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ----------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------
def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Rope theta and scaling from either convention: 4.x `rope_theta`/`rope_scaling`, 5.x `rope_parameters`."""
  params = hf.get("rope_parameters") or {}
  if params and all(isinstance(v, Mapping) for v in params.values()):  # per-layer-type parameters
    distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
    if len(distinct) != 1:
      raise ValueError(f"config.json rope_parameters differ between layer types ({sorted(params)}); unsupported")
    params = next(iter(params.values()))
  scaling = hf.get("rope_scaling") or params
  theta = hf.get("rope_theta", params.get("rope_theta", 10_000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  out: dict[str, Any] = {"rope_theta": float(theta)}
  if kind == "default":
    out["rope_scaling"] = "none"
  elif kind == "linear":
    out.update(rope_scaling="linear", rope_scaling_factor=float(scaling["factor"]))
  elif kind == "llama3":
    out.update(
        rope_scaling="llama3",
        rope_scaling_factor=float(scaling["factor"]),
        rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_len=int(scaling["original_max_position_embeddings"]),
    )
  elif kind == "dynamic":  # the length threshold is max_position_embeddings, read with the rest of the config
    out.update(rope_scaling="dynamic_ntk", rope_scaling_factor=float(scaling["factor"]))
  elif kind == "yarn":
    original = scaling.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    factor = scaling.get("factor") or float(hf["max_position_embeddings"]) / original
    out.update(rope_scaling="yarn", rope_scaling_factor=float(factor), rope_original_max_len=int(original),
               rope_yarn_beta_fast=float(scaling.get("beta_fast") or 32.0),
               rope_yarn_beta_slow=float(scaling.get("beta_slow") or 1.0),
               rope_yarn_truncate=bool(scaling.get("truncate", True)),
               rope_attention_factor=_yarn_attention_factor(scaling, float(factor)))
  else:
    raise ValueError(f"config.json rope scaling type {kind!r} is not supported (default, linear, llama3, dynamic, yarn)")
  return out


def _yarn_attention_factor(scaling: Mapping[str, Any], factor: float) -> float:
  """An explicit attention_factor, or DeepSeek's mscale / mscale_all_dim ratio; 0.0 (the paper's
  0.1 ln(factor) + 1, model/positional.py) otherwise."""
  if scaling.get("attention_factor") is not None:
    return float(scaling["attention_factor"])
  mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if mscale and mscale_all_dim:
    def get(m):
      return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
    return get(mscale) / get(mscale_all_dim)
  return 0.0


def _global_layer_every(layer_types: list[str]) -> int:
  """n such that layer i is global exactly when (i + 1) % n == 0, from Gemma 2's `layer_types`."""
  num_layers = len(layer_types)
  for n in range(1, num_layers + 2):
    if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(layer_types)):
      return n
  raise ValueError(f"config.json layer_types={layer_types} is not a repeating local/global pattern")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A ModelConfig from a Hugging Face config.json dict; `overrides` replace any field."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"config.json model_type={family!r} is not supported; supported: {FAMILIES}")

  def require(key):
    if hf.get(key) is None:
      raise ValueError(f"config.json of model_type={family!r} has no {key!r}")
    return hf[key]

  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key) and family != "qwen2":
      raise ValueError(f"config.json {key}=true is not supported for model_type={family!r}")
  hidden, heads = int(require("hidden_size")), int(require("num_attention_heads"))
  act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if family == "gemma" and hf.get("hidden_activation") is None:
    act_name = "gelu_pytorch_tanh"  # transformers' Gemma uses the tanh approximation by default
  if act_name not in _ACTIVATIONS_FROM_HF:
    raise ValueError(f"config.json activation {act_name!r} is not supported; supported: {sorted(_ACTIVATIONS_FROM_HF)}")
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if dtype not in _DTYPES:
    raise ValueError(f"config.json dtype {dtype!r} is not supported; supported: {sorted(_DTYPES)}")

  fields: dict[str, Any] = dict(
      vocab_size=int(require("vocab_size")),
      embed_dim=hidden,
      num_layers=int(require("num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      mlp_dim=int(require("intermediate_size")),
      mlp_activation=_ACTIVATIONS_FROM_HF[act_name],
      norm="gemma_rms" if family.startswith("gemma") else "rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      position="rope",
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      qkv_bias=family == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", _TIED_BY_DEFAULT[family])),
      scale_embeddings=family.startswith("gemma"),
      dtype=_DTYPES[dtype],
      param_dtype=_DTYPES[dtype],
      **_rope_from_hf(hf),
  )
  if family == "mistral":
    fields["sliding_window"] = int(hf.get("sliding_window") or 0)
  if family == "qwen2" and hf.get("use_sliding_window"):
    raise ValueError("config.json use_sliding_window=true (Qwen2 per-layer windows) is not supported")
  if family == "gemma2":
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(fields["num_layers"])
    ]
    fields.update(
        post_norms=True,
        sliding_window=int(hf.get("sliding_window") or 0),
        global_layer_every=_global_layer_every(layer_types),
        attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or fields["head_dim"]),
    )
    if not fields["sliding_window"]:
      fields["global_layer_every"] = 0
  return ModelConfig(**{**fields, **overrides})


def hf_family(config: ModelConfig) -> str:
  """The transformers model_type that can represent `config`, or a ValueError saying why none can."""
  c = config
  if c.position != "rope" or c.norm == "layer":
    raise ValueError(f"position={c.position!r}, norm={c.norm!r} has no Hugging Face family here (rope + RMSNorm only)")
  if c.norm == "gemma_rms":
    if c.post_norms or c.attn_logit_softcap or c.final_logit_softcap or c.global_layer_every:
      return "gemma2"
    if c.sliding_window:
      raise ValueError("a Gemma (1) config cannot have sliding_window; Gemma 2 needs post_norms=True")
    return "gemma"
  if c.post_norms or c.attn_logit_softcap or c.final_logit_softcap or c.global_layer_every or c.scale_embeddings:
    raise ValueError("post_norms, soft-caps, global_layer_every and scale_embeddings are exported only with norm='gemma_rms'")
  if c.qkv_bias:
    if c.sliding_window:
      raise ValueError("qkv_bias with sliding_window has no Hugging Face family here")
    return "qwen2"
  return "mistral" if c.sliding_window else "llama"


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  c = config
  family = hf_family(c)
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[family]],
      "model_type": family,
      "vocab_size": c.vocab_size,
      "hidden_size": c.embed_dim,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "intermediate_size": c.mlp_dim,
      "hidden_act": _ACTIVATIONS_TO_HF[c.mlp_activation],
      "rms_norm_eps": c.norm_eps,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_embeddings,
      "rope_theta": c.rope_theta,
      "torch_dtype": c.param_dtype,
      "dtype": c.param_dtype,
      "attention_bias": False,
      "bos_token_id": None,
      "eos_token_id": None,
  }
  if family.startswith("gemma"):
    out["hidden_activation"] = _ACTIVATIONS_TO_HF[c.mlp_activation]
  if c.rope_scaling == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_scaling_factor}
  elif c.rope_scaling == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": c.rope_scaling_factor,
        "low_freq_factor": c.rope_low_freq_factor,
        "high_freq_factor": c.rope_high_freq_factor,
        "original_max_position_embeddings": c.rope_original_max_len,
    }
  elif c.rope_scaling == "ntk":  # a static base change: plain rope with the changed base is the same model
    out["rope_theta"] = c.rope_theta * c.rope_scaling_factor ** (c.head_dim / (c.head_dim - 2))
  elif c.rope_scaling == "dynamic_ntk":
    out["rope_scaling"] = {"rope_type": "dynamic", "factor": c.rope_scaling_factor}
  elif c.rope_scaling == "yarn":
    out["rope_scaling"] = {
        "rope_type": "yarn",
        "factor": c.rope_scaling_factor,
        "original_max_position_embeddings": c.rope_original_max_len,
        "beta_fast": c.rope_yarn_beta_fast,
        "beta_slow": c.rope_yarn_beta_slow,
        "truncate": c.rope_yarn_truncate,
        "attention_factor": positional.rope_attention_factor(c),
    }
  if family == "mistral":
    out["sliding_window"] = c.sliding_window
  if family == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
  if family == "gemma2":
    if not c.query_pre_attn_scalar:
      c = c.replace(query_pre_attn_scalar=float(c.head_dim))
    out.update(
        sliding_window=c.sliding_window or None,
        layer_types=["full_attention" if not c.layer_window(i) else "sliding_attention" for i in range(c.num_layers)],
        attn_logit_softcapping=c.attn_logit_softcap or None,
        final_logit_softcapping=c.final_logit_softcap or None,
        # transformers 5 validates this field as an int.
        query_pre_attn_scalar=int(c.query_pre_attn_scalar) if float(c.query_pre_attn_scalar).is_integer()
        else c.query_pre_attn_scalar,
    )
  return out


# ----------------------------------------------------------------------------------------------
# Where each of our parameters lives in a Hugging Face checkpoint.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tensor:
  """Our parameter <-> HF tensor(s). in_rank: for a Linear weight [out, in], how many of our
  leading dims make up `in` (ours = W.T reshaped); None for tensors that are only reshaped."""

  hf_names: tuple[str, ...]  # one per layer for a scanned parameter, else one
  in_rank: int | None
  stacked: bool


def _block_tensors(family: str, post_norms: bool) -> dict[tuple[str, ...], tuple[str, int | None]]:
  names = {
      ("attn", "wq"): ("self_attn.q_proj.weight", 1),
      ("attn", "wk"): ("self_attn.k_proj.weight", 1),
      ("attn", "wv"): ("self_attn.v_proj.weight", 1),
      ("attn", "wo"): ("self_attn.o_proj.weight", 2),
      ("attn", "bq"): ("self_attn.q_proj.bias", None),
      ("attn", "bk"): ("self_attn.k_proj.bias", None),
      ("attn", "bv"): ("self_attn.v_proj.bias", None),
      ("mlp", "w_gate"): ("mlp.gate_proj.weight", 1),
      ("mlp", "w_up"): ("mlp.up_proj.weight", 1),
      ("mlp", "w_down"): ("mlp.down_proj.weight", 1),
      ("attn_norm", "scale"): ("input_layernorm.weight", None),
  }
  if post_norms:  # Gemma 2 names its four norms by position
    names[("attn_post_norm", "scale")] = ("post_attention_layernorm.weight", None)
    names[("mlp_norm", "scale")] = ("pre_feedforward_layernorm.weight", None)
    names[("mlp_post_norm", "scale")] = ("post_feedforward_layernorm.weight", None)
  else:
    names[("mlp_norm", "scale")] = ("post_attention_layernorm.weight", None)
  return names


def _layout(config: ModelConfig, state: nnx.State) -> dict[tuple, _Tensor]:
  """Our flat parameter path -> where it lives in the HF checkpoint, for every parameter of `state`."""
  block = _block_tensors(hf_family(config), config.post_norms)
  layout = {}
  for path, _ in nnx.to_flat_state(state):
    path = tuple(path)
    if path == ("embedding",):
      layout[path] = _Tensor(("model.embed_tokens.weight",), None, False)
    elif path == ("lm_head",):
      layout[path] = _Tensor(("lm_head.weight",), 1, False)
    elif path == ("final_norm", "scale"):
      layout[path] = _Tensor(("model.norm.weight",), None, False)
    elif path[0] == "layers" and config.scan_layers:
      suffix, in_rank = block[path[1:]]
      layout[path] = _Tensor(tuple(f"model.layers.{i}.{suffix}" for i in range(config.num_layers)), in_rank, True)
    elif path[0] == "layers":
      suffix, in_rank = block[path[2:]]
      layout[path] = _Tensor((f"model.layers.{path[1]}.{suffix}",), in_rank, False)
    else:
      raise ValueError(f"parameter {'.'.join(map(str, path))} has no Hugging Face name")
  return layout


def _to_ours(hf_tensor: np.ndarray, shape: tuple[int, ...], in_rank: int | None) -> np.ndarray:
  if in_rank is not None:
    hf_tensor = hf_tensor.T  # torch Linear stores [out, in]; we store [in..., out...]
  if math.prod(hf_tensor.shape) != math.prod(shape):
    raise ValueError(f"checkpoint tensor of shape {hf_tensor.shape} cannot become a parameter of shape {shape}")
  return hf_tensor.reshape(shape)


def _to_hf(ours: np.ndarray, name: str, in_rank: int | None) -> np.ndarray:
  if in_rank is None:  # biases are flat in HF ([N * H]); norms and embeddings keep their shape
    return ours.reshape(-1) if name.endswith(".bias") else ours
  fan_in = math.prod(ours.shape[:in_rank])
  return np.ascontiguousarray(ours.reshape(fan_in, -1).T)


# ----------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------
class _Checkpoint(contextlib.ExitStack):
  """Name -> tensor access across the safetensors files of a checkpoint directory."""

  def __init__(self, path: Path):
    super().__init__()
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
      weight_map = json.loads(index_file.read_text())["weight_map"]
    else:
      files = sorted(path.glob("*.safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
      weight_map = {}
      for file in files:
        with safe_open(file, framework="numpy") as f:
          weight_map.update({name: file.name for name in f.keys()})
    self.weight_map = weight_map
    self._path, self._handles = path, {}

  def get(self, name: str) -> np.ndarray:
    if name not in self.weight_map:
      raise KeyError(f"tensor {name!r} is not in the checkpoint at {self._path}")
    file = self.weight_map[name]
    if file not in self._handles:
      if not (self._path / file).exists():
        raise FileNotFoundError(f"{self._path / file} (named by the index for {name!r}) does not exist")
      self._handles[file] = self.enter_context(safe_open(self._path / file, framework="numpy"))
    return self._handles[file].get_tensor(name)


def from_pretrained(
    path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, rules: Rules = DEFAULT_RULES, **overrides: Any
) -> Transformer:
  """A Transformer with the weights of the Hugging Face checkpoint directory `path`.

  overrides: ModelConfig fields to change (dtype, param_dtype, attention_impl, scan_layers, ...).
  With `mesh`, parameters are placed on it by `rules`; otherwise on the default device.
  """
  path = Path(path)
  config_file = path / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} does not exist; expected a Hugging Face checkpoint directory")
  config = config_from_hf(json.loads(config_file.read_text()), **overrides)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  if mesh is not None:
    shardings = state_shardings(abstract_state, mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(
        lambda v: v.replace(device), abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
  layout = _layout(config, abstract_state)
  sharding_of = dict(nnx.to_flat_state(shardings))
  loaded = []
  with _Checkpoint(path) as checkpoint:
    used = set()
    for our_path, variable in nnx.to_flat_state(abstract_state):
      tensor = layout[tuple(our_path)]
      shape, dtype = variable.get_value().shape, variable.get_value().dtype
      per_layer = shape[1:] if tensor.stacked else shape
      host = np.empty(shape, dtype)  # one parameter (all its layers) on the host at a time
      for i, name in enumerate(tensor.hf_names):
        value = _to_ours(checkpoint.get(name), per_layer, tensor.in_rank).astype(dtype)
        if tensor.stacked:
          host[i] = value
        else:
          host[...] = value
        used.add(name)
      array = jax.make_array_from_callback(shape, sharding_of[our_path].get_value(), lambda index, h=host: h[index])
      loaded.append((our_path, variable.replace(array)))
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # some tied checkpoints keep a copy
    unused = [
        name for name in sorted(set(checkpoint.weight_map) - used - ignorable)
        if not name.endswith("rotary_emb.inv_freq")  # a buffer some old exports saved
    ]
    if unused:
      raise ValueError(f"checkpoint at {path} has tensors this config does not use: {unused[:8]}")
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


# ----------------------------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------------------------
def _host_value(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:  # multi-host: gather the global value on every process
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def _hf_tensors(module: Transformer) -> Iterator[tuple[str, tuple[int, ...], Any]]:
  """(HF name, HF shape, a function producing the tensor) for every tensor, in file order."""
  config = module.config
  state = nnx.state(module, nnx.Param)
  layout = _layout(config, state)
  for our_path, variable in nnx.to_flat_state(state):
    tensor = layout[tuple(our_path)]
    array = variable.get_value()
    per_layer = np.empty(array.shape[1:] if tensor.stacked else array.shape, np.uint8)  # shape only
    fetch = _lazy_host_value(array)
    last = len(tensor.hf_names) - 1
    for i, name in enumerate(tensor.hf_names):
      shape = _to_hf(per_layer, name, tensor.in_rank).shape

      def produce(i=i, name=name, tensor=tensor, fetch=fetch):
        value = fetch(release=i == last)
        return _to_hf(value[i] if tensor.stacked else value, name, tensor.in_rank)

      yield name, shape, produce


def _lazy_host_value(array: jax.Array):
  """Fetches `array` to the host on first call and keeps it until a call with release=True,
  so the layers of a stacked parameter share one transfer and one parameter is resident at a time."""
  cache = []

  def fetch(release: bool):
    if not cache:
      cache.append(_host_value(array))
    return cache.pop() if release else cache[0]

  return fetch


def save_pretrained(module: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `module` as a Hugging Face checkpoint directory (config.json + safetensors).

  Tensors above `max_shard_bytes` in all go to several files with a `model.safetensors.index.json`.
  Each file is written as soon as its tensors are ready, so the host holds about one shard.
  The directory is written under a temporary name and renamed into place, so a crash never
  leaves a half-written checkpoint at `path`. On several hosts, every process joins the
  gathers and process 0 writes.
  """
  path = Path(path)
  tensors = list(_hf_tensors(module))
  itemsize = np.dtype(module.config.weight_dtype).itemsize
  files: list[list[int]] = [[]]  # indices into `tensors`, per file
  size = 0
  for i, (_, shape, _) in enumerate(tensors):
    nbytes = math.prod(shape) * itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append(i)
    size += nbytes
  names = ["model.safetensors"] if len(files) == 1 else [
      f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))
  ]
  write = jax.process_index() == 0
  if write:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  weight_map, total = {}, 0
  for file, members in zip(names, files):
    shard = {tensors[i][0]: tensors[i][2]() for i in members}  # every process joins the gathers
    weight_map.update({name: file for name in shard})
    total += sum(v.nbytes for v in shard.values())
    if write:
      save_file(shard, str(tmp / file), metadata={"format": "pt"})
  if not write:
    return
  if len(files) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  (tmp / "config.json").write_text(json.dumps(config_to_hf(module.config), indent=2))
  if path.exists():  # swap in the new directory, then drop the old one
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old)
  else:
    tmp.rename(path)
