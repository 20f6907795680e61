"""What a scaling sweep trains: model sizes x compute budgets (IsoFLOP profiles), each point a run.

Pure planning, no jax: `plan(config)` turns a sweep config (configs/scaling/) into `Point`s, and
`point_config(config, point)` into the ordinary training config of one point. A point's tokens
follow from its budget, C = (FLOPs per token) x D, with FLOPs per token counted as config.flop_count
says ('6nd': 6 N, N counted as config.counting says; 'model': model.flops_per_token, attention
included). Its learning-rate schedule is as long as its run (Hoffmann et al. 2022: a cosine cycle
longer than the run overestimates the loss at its end), and so are its warmup and logging.
"""

import dataclasses
import re

import ml_collections

from configs import validation
from model import config as model_config_lib

PLAN_FILE = "sweep.json"  # a sweep directory: PLAN_FILE and POINTS_DIR/<point name>/, each an ordinary run dir
POINTS_DIR = "points"
COUNTINGS = ("non_embedding", "total")
FLOP_COUNTS = ("6nd", "model")
_SIZE = re.compile(r"^d(\d+)l(\d+)$")


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: `name` is its directory under WORKDIR/points/."""

  name: str
  kind: str  # 'grid' | 'extrapolation'
  budget: float  # the FLOPs it was sized for
  size: str  # 'd128l4': embed_dim 128, 4 layers
  n_params: int
  n_params_non_embedding: int
  tokens: int  # steps * batch_size * seq_len
  flops_per_token: float  # C / D as config.flop_count counts it
  steps: int
  batch_size: int
  seq_len: int


def parse_list(text: str, key: str, cast=float) -> list:
  """'1e12, 2e12' -> [1e12, 2e12]; an empty or bad item is an error naming config.<key>."""
  items = [item.strip() for item in str(text).split(",") if item.strip()]
  if not items:
    raise validation.ConfigError(f"config.{key}={text!r} is empty")
  try:
    return [cast(item) for item in items]
  except ValueError as e:
    raise validation.ConfigError(f"config.{key}={text!r}: {e}") from None


def size_fields(config: ml_collections.ConfigDict, size: str) -> dict[str, int]:
  """'d128l4' -> the ModelConfig fields of that shape: heads of config.head_dim, config.kv_heads_ratio
  query heads per kv head, an MLP config.mlp_ratio times the width."""
  match = _SIZE.match(size)
  if not match:
    raise validation.ConfigError(f"config.sizes: {size!r} is not d<embed_dim>l<num_layers> (e.g. d128l4)")
  embed_dim, num_layers = int(match[1]), int(match[2])
  if embed_dim % config.head_dim:
    raise validation.ConfigError(f"config.sizes: {size!r} has a width not divisible by config.head_dim={config.head_dim}")
  num_heads = embed_dim // config.head_dim
  if num_heads % config.kv_heads_ratio:
    raise validation.ConfigError(
        f"config.sizes: {size!r} has {num_heads} heads, not divisible by config.kv_heads_ratio={config.kv_heads_ratio}")
  mlp_dim = int(round(config.mlp_ratio * embed_dim / 32)) * 32
  return dict(embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
              num_kv_heads=num_heads // config.kv_heads_ratio, head_dim=config.head_dim, mlp_dim=mlp_dim)


def _model(config: ml_collections.ConfigDict, size: str) -> model_config_lib.ModelConfig:
  """The architecture of a point (the base's preset and fields, the size's shape)."""
  fields = validation.set_model_fields(config.base.model)
  fields.update(size_fields(config, size))
  fields.setdefault("vocab_size", config.base.tokenizer.vocab_size)  # from scratch, the tokenizer's
  return validation.build_model_config(ml_collections.ConfigDict({"preset": config.base.model.preset, **fields}))


def counted_params(model: model_config_lib.ModelConfig, counting: str) -> int:
  if counting == "total":
    return model_config_lib.param_count(model)
  return model_config_lib.non_embedding_param_count(model)


def flops_per_token(config: ml_collections.ConfigDict, model: model_config_lib.ModelConfig) -> float:
  if config.flop_count == "model":
    return model_config_lib.flops_per_token(model, config.base.seq_len)
  return 6.0 * counted_params(model, config.counting)


def make_point(config: ml_collections.ConfigDict, size: str, budget: float, kind: str = "grid") -> Point:
  """The point of `size` trained for `budget` FLOPs (whole steps, so its FLOPs are within a step of it)."""
  model = _model(config, size)
  per_token = flops_per_token(config, model)
  tokens_per_step = config.base.batch_size * config.base.seq_len
  steps = max(int(round(budget / per_token / tokens_per_step)), 1)
  prefix = "x" if kind == "extrapolation" else "c"
  return Point(
      name=f"{prefix}{budget:.3g}_{size}".replace("+", ""), kind=kind, budget=float(budget), size=size,
      n_params=model_config_lib.param_count(model), n_params_non_embedding=model_config_lib.non_embedding_param_count(model),
      tokens=steps * tokens_per_step, flops_per_token=per_token, steps=steps, batch_size=config.base.batch_size,
      seq_len=config.base.seq_len,
  )


def check(config: ml_collections.ConfigDict) -> None:
  if config.counting not in COUNTINGS:
    raise validation.ConfigError(f"config.counting={config.counting!r} must be one of {COUNTINGS}")
  if config.flop_count not in FLOP_COUNTS:
    raise validation.ConfigError(f"config.flop_count={config.flop_count!r} must be one of {FLOP_COUNTS}")
  for key in ("parallel", "min_steps", "log_points", "head_dim", "kv_heads_ratio"):
    if config[key] < 1:
      raise validation.ConfigError(f"config.{key}={config[key]} must be >= 1")
  if config.max_steps < config.min_steps:
    raise validation.ConfigError(f"config.max_steps={config.max_steps} is below config.min_steps={config.min_steps}")
  if config.extrapolate < 0 or 0 < config.extrapolate <= 1:
    raise validation.ConfigError(f"config.extrapolate={config.extrapolate} must be 0 (off) or > 1")
  if not 0 <= config.warmup_fraction < 1:
    raise validation.ConfigError(f"config.warmup_fraction={config.warmup_fraction} must be in [0, 1)")


def plan(config: ml_collections.ConfigDict) -> list[Point]:
  """The grid: every size at every budget whose step count lies in [min_steps, max_steps]; a budget
  left with fewer than 3 sizes cannot have a parabola fitted and is an error."""
  check(config)
  sizes = parse_list(config.sizes, "sizes", str)
  points = []
  for budget in parse_list(config.budgets, "budgets"):
    profile = [make_point(config, size, budget) for size in sizes]
    profile = [p for p in profile if config.min_steps <= p.steps <= config.max_steps]
    if len(profile) < 3:
      raise validation.ConfigError(
          f"config.budgets: {budget:g} FLOPs leaves {len(profile)} of config.sizes within "
          f"[config.min_steps, config.max_steps] = [{config.min_steps}, {config.max_steps}] steps; an IsoFLOP "
          "profile needs at least 3")
    points += profile
  return points


def point_config(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """The training config of one point: the base config, the point's shape and steps, a schedule and
  logging as long as its run, evaluation and a checkpoint at its end (and a few on the way)."""
  run = ml_collections.ConfigDict(config.base.to_dict())
  run.model.update(size_fields(config, point.size))
  if run.model.vocab_size is None:
    run.model.vocab_size = config.base.tokenizer.vocab_size  # the size the plan counted
  run.total_steps = point.steps
  run.optimizer.warmup_steps = int(config.warmup_fraction * point.steps)
  run.log_every = max(point.steps // config.log_points, 1)
  run.eval_every = point.steps  # the held-out loss at the end: the point's loss
  run.checkpoint_every = max(point.steps // 4, 1)  # a killed sweep loses at most a quarter of a point
  run.keep_checkpoints = 1
  run.sample_prompt = ""
  return run
