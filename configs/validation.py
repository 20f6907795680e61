"""Start-up checks for experiment configs: each error names the offending key and value."""

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from model.config import ModelConfig, get_preset
from model.sharding import MESH_AXES, resolve_mesh_sizes


class ConfigError(ValueError):
  """A config key or value that cannot run."""


def check_keys(config: Mapping[str, Any], reference: Mapping[str, Any], prefix: str = "config") -> None:
  """Every key of `config` exists in `reference`, with a value of a compatible type (recursively).

  `reference` is the experiment's own defaults (the dict `get_config` builds); a typo or a key
  from another experiment is caught here rather than silently ignored.
  """
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if key not in reference:
      raise ConfigError(f"{name} is not a known key; known keys at {prefix}: {sorted(reference)}")
    expected = reference[key]
    if isinstance(expected, Mapping):
      if not isinstance(value, Mapping):
        raise ConfigError(f"{name}={value!r} must be a dict of {sorted(expected)}")
      check_keys(value, expected, name)
    elif expected is not None and value is not None and not _compatible(value, expected):
      raise ConfigError(f"{name}={value!r} has type {type(value).__name__}, expected {type(expected).__name__}")


def _compatible(value: Any, expected: Any) -> bool:
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(expected, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float))
  if isinstance(expected, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(expected))


def set_model_fields(model: Mapping[str, Any]) -> dict[str, Any]:
  """The fields a config.model block sets: its non-None values ('preset' names the base, not a field)."""
  return {k: v for k, v in model.items() if k != "preset" and v is not None}


def build_model_config(model: Mapping[str, Any], prefix: str = "config.model") -> ModelConfig:
  """The ModelConfig of `config.model` (a preset name plus overrides), or a ConfigError naming the key."""
  model = dict(model.items())
  preset = model.pop("preset", None)
  if preset is None:
    raise ConfigError(f"{prefix}.preset is missing")
  try:
    base = get_preset(preset)
  except ValueError as e:
    raise ConfigError(f"{prefix}.preset: {e}") from None
  overrides = set_model_fields(model)
  fields = set(base.__dataclass_fields__)
  for key in overrides:
    if key not in fields:
      raise ConfigError(f"{prefix}.{key} is not a ModelConfig field; fields: {sorted(fields)}")
  try:
    return base.replace(**overrides)
  except ValueError as e:  # ModelConfig names the field; say where it came from
    raise ConfigError(f"{prefix} (preset {preset!r} with overrides {overrides}): {e}") from None


def check_mesh(mesh: Mapping[str, int], device_count: int) -> dict[str, int]:
  """Resolved mesh sizes (-1 filled in) that multiply to `device_count`, or a ConfigError naming the key."""
  try:
    return resolve_mesh_sizes(mesh, device_count)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None


def check_sharding_rules(rules: Sequence[Sequence[Any]], prefix: str = "config.sharding_rules") -> None:
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"{prefix}[{i}]={rule!r} must be (logical_axis, mesh_axes)")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],) if rule[1] else ()
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ConfigError(f"{prefix}[{i}] ({rule[0]!r}) names unknown mesh axes {bad}; the axes are {MESH_AXES}")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A plain, JSON-friendly dict of a ConfigDict (FieldReferences resolved)."""
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
