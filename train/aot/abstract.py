"""A run's state as shapes, dtypes and shardings only: what ahead-of-time compilation lowers against.

Nothing is allocated: the module is built under `nnx.eval_shape`, each variable gets the
NamedSharding its logical axes give on the mesh (as `model.sharding.create_sharded` places a real
run's), and the optimizer state the shardings the trainer gives it (train.step.state_shardings: each moment
on its parameter's shards).
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import model as model_lib
from configs import validation
from model import peft, sharding
from rundir import loading
from train import data, optimizer as optimizer_lib
from train import step as step_lib
from train import trainer


@dataclasses.dataclass
class AbstractRun:
  """A run's pieces as the trainer holds them, with ShapeDtypeStructs for arrays."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: sharding.Rules
  model_config: model_lib.ModelConfig
  graphdef: nnx.GraphDef
  params: Any  # nnx.State of ShapeDtypeStruct, sharded
  rest: Any  # the variables not trained (a frozen base, a reference), sharded
  optimizer: Any
  schedule: Any
  state: dict[str, Any] = None  # init_state's structure, sharded as the trainer's would be
  state_shardings: Any = None


def with_sharding(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (a tree of the same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_module(make_module: Callable[[], nnx.Module], mesh: Mesh, rules) -> nnx.Module:
  """`make_module()` as an abstract module whose variables are ShapeDtypeStructs with their shardings."""
  with sharding.axis_rules(mesh, rules):
    abstract = nnx.eval_shape(make_module)
  graphdef, state = nnx.split(abstract)
  shardings = sharding.state_shardings(state, mesh, rules)
  return nnx.merge(graphdef, with_sharding(state, shardings))


def decoder_factory(config: ml_collections.ConfigDict) -> tuple[model_lib.ModelConfig, Callable[[], nnx.Module]]:
  """The config's decoder (its preset with overrides; with config.peft, adapters on it), unbuilt."""
  model_config = validation.build_model_config(config.model)

  def make():
    decoder = model_lib.Transformer(model_config, rngs=nnx.Rngs(config.seed))
    if loading.peft_on(config):
      peft.add_adapters(decoder, config.peft, rngs=nnx.Rngs(config.seed))
    return decoder

  return model_config, make


def build(config: ml_collections.ConfigDict, devices, *, make_module=None, decoder_path: str = "") -> AbstractRun:
  """The abstract run of `config` on `devices` (compile-only TPU devices, or any others).

  make_module: a method's module around the decoder (default: the decoder itself); decoder_path
  the attribute holding the decoder in it, as for trainer.setup's wrap_model.
  """
  mesh, rules = trainer.mesh_and_rules(config, devices)
  model_config, make_decoder = decoder_factory(config)
  module = abstract_module(make_module or make_decoder, mesh, rules)
  graphdef, params, rest = nnx.split(module, loading.run_trainable(config, decoder_path), ...)
  optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
  run = AbstractRun(config=config, mesh=mesh, rules=rules, model_config=model_config, graphdef=graphdef,
                    params=params, rest=rest, optimizer=optimizer, schedule=schedule)
  shapes = jax.eval_shape(functools.partial(step_lib.init_state, optimizer=optimizer, seed=config.seed), params)
  run.state_shardings = step_lib.state_shardings(params, optimizer, mesh)
  run.state = with_sharding(shapes, run.state_shardings)
  return run


def batch(config: ml_collections.ConfigDict, mesh: Mesh, rules) -> dict[str, Any]:
  """A pre-training batch (train.data.BATCH_KEYS, each int32 [B, T]), sharded over the batch axes
  as trainer.global_batch places one."""
  shape = (config.batch_size, config.seq_len)
  spec = sharding.logical_to_spec(trainer.BATCH_AXES, shape, mesh, rules)
  placed = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, spec))
  return {key: placed for key in data.BATCH_KEYS}
