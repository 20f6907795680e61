"""Helpers shared by every experiment config: parsing `arg`, model presets, mesh and sharding rules.

An experiment file is `configs/<area>/<name>.py` with `get_config(arg=None)`; `arg` is the text
after the colon in `--config=configs/<area>/<name>.py:model=llama3.2-1b,runlocal=True`.
"""

import ast
import dataclasses
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from model import peft
from model.config import PRESETS, ModelConfig
from model.sharding import DEFAULT_RULES, MESH_AXES


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'a=1,b=x,c=True' -> ConfigDict(a=1, b='x', c=True), every key given a default.

  Values are cast to the type of their default; an unknown key is an error naming it.
  """
  parsed = ml_collections.ConfigDict(defaults)
  if not arg:
    return parsed
  for item in arg.split(","):
    if "=" not in item:
      raise ValueError(f"config arg item {item!r} is not key=value (in {arg!r})")
    key, value = (part.strip() for part in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"config arg key {key!r} is unknown; known keys: {sorted(defaults)}")
    parsed[key] = _cast(key, value, defaults[key])
  return parsed


def _cast(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"config arg {key}={text!r} is not a bool")
    return text.lower() in ("true", "1")
  if isinstance(default, (int, float)):
    try:
      return type(default)(ast.literal_eval(text))
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"config arg {key}={text!r} is not a {type(default).__name__}") from e
  return text


def _field_types() -> dict[str, type]:
  hints = typing.get_type_hints(ModelConfig)
  return {f.name: hints[f.name] for f in dataclasses.fields(ModelConfig)}


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`config.model`: a preset name, and every ModelConfig field as a typed placeholder.

  A field left None takes the preset's value, so `--config.model.preset=llama3.2-1b` switches the
  whole architecture while `--config.model.num_layers=4` changes one field of it.
  """
  if preset not in PRESETS:
    raise ValueError(f"config.model.preset={preset!r} is unknown; known presets: {sorted(PRESETS)}")
  cfg = ml_collections.ConfigDict({"preset": preset})
  cfg.update(model_overrides(**overrides))
  return cfg


def model_overrides(**overrides: Any) -> ml_collections.ConfigDict:
  """Every ModelConfig field as a typed placeholder, `overrides` set: the fields to change in a
  model loaded from a checkpoint (its non-None values)."""
  types = _field_types()
  unknown = sorted(set(overrides) - set(types))
  if unknown:
    raise ValueError(f"config.model has unknown key(s) {unknown}; ModelConfig fields: {sorted(types)}")
  cfg = ml_collections.ConfigDict()
  for name, field_type in types.items():
    cfg[name] = config_dict.placeholder(field_type)
    if name in overrides:
      cfg[name] = overrides[name]
  return cfg


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1) -> ml_collections.ConfigDict:
  """`config.mesh`: sizes of the axes ('data', 'fsdp', 'tensor', 'sequence'); one may be -1 (the rest)."""
  return ml_collections.ConfigDict(dict(zip(MESH_AXES, (data, fsdp, tensor, sequence))))


def sharding_rules() -> tuple[tuple[str, tuple[str, ...]], ...]:
  """`config.sharding_rules`: logical axis -> mesh axes. Copy and edit to change parallelism."""
  return DEFAULT_RULES


def tokenizer_config() -> ml_collections.ConfigDict:
  """`config.tokenizer`: the run's sentencepiece model (keys explained in rundir/tokenizer.py)."""
  return ml_collections.ConfigDict(
      dict(path="", vocab_size=4096, model_type="bpe", byte_fallback=True, special_tokens="")
  )


def data_config() -> ml_collections.ConfigDict:
  """`config.data`: documents to pack (keys explained in train/data.py)."""
  return ml_collections.ConfigDict(
      dict(
          source="default", paths="", eval_paths="", eval_percent=2.0, text_field="text",
          text_unit="paragraph", num_threads=2, prefetch_buffer=4, process_sharding="rows",
      )
  )


def optimizer_config() -> ml_collections.ConfigDict:
  """`config.optimizer` (keys explained in train/optimizer.py)."""
  return ml_collections.ConfigDict(
      dict(
          name="adamw", learning_rate=3e-4, schedule="warmup_cosine", warmup_steps=100, decay_steps=0,
          min_learning_rate_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_norms=False,
          decay_biases=False, decay_embeddings=False, grad_clip_norm=1.0,
      )
  )


def peft_config(**overrides: Any) -> ml_collections.ConfigDict:
  """`config.peft`: adapters and a quantized base (keys explained in model/peft.py); method 'none'
  trains every parameter."""
  return peft.config(**overrides)


def distributed_config() -> ml_collections.ConfigDict:
  """`config.distributed`: how processes join a multi-host run (keys explained in train/distributed.py)."""
  return ml_collections.ConfigDict(dict(coordinator_address="", num_processes=-1, process_id=-1, auto=False))


def train_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Every key of a training run, with defaults; experiment files start here and change what they need.

  This dict is also the reference of the start-up check: a key not in it is a typo.
  """
  config = ml_collections.ConfigDict()
  config.total_steps = 1000
  config.batch_size = 32  # global, across all processes
  config.seq_len = 512
  config.seed = 0
  config.grad_accum_steps = 1  # batch_size splits into this many micro-batches
  config.log_every = 10
  config.eval_every = 200  # 0: never
  config.eval_steps = 20  # held-out batches per evaluation; 0: the whole split
  config.checkpoint_every = 500  # 0: only at the end (and on SIGTERM)
  config.keep_checkpoints = 3
  config.init_from = ""  # a Hugging Face directory or another run's workdir
  config.z_loss = 0.0
  config.max_nonfinite_in_row = 20  # 0: never stop for non-finite steps
  # >0: stop (checkpoint and scores as at the end) after the step that spends this many seconds of training
  # wall time, evaluation excluded (several processes: the logged step): runs compared at equal wall time.
  # The schedule stays that of total_steps.
  config.max_train_seconds = 0.0
  # Watts per device for the energy estimate in metrics.jsonl and summary.json; 0: the device kind's
  # stated power where known (train/metrics.py), else no estimate.
  config.device_power_watts = 0.0
  # `python -m train` ends by printing the model's continuation of this prompt ('': no sample).
  config.sample_prompt = ""
  config.sample_tokens = 48
  config.sample_temperature = 0.0  # 0: greedy
  config.sample_top_p = 1.0  # nucleus sampling; 1: off
  config.sample_seed = 0
  config.mesh = mesh_config()
  config.sharding_rules = sharding_rules()
  # The Cloud TPU slice the config is sized for ('v5p-64'; '' for none): `python -m train.aot`
  # compiles for it when --topology is not given. Nothing else reads it.
  config.topology = ""
  # Mixed precision: bf16 activations and matmuls, fp32 parameters and optimizer state.
  config.model = model_config("tiny", dtype="bfloat16", param_dtype="float32")
  config.tokenizer = tokenizer_config()
  config.data = data_config()
  config.optimizer = optimizer_config()
  config.peft = peft_config()
  config.distributed = distributed_config()
  config.update(overrides)
  return config
