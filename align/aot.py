"""GRPO's programs for ahead-of-time compilation (`python -m train.aot --job=grpo`): its train step,
exactly as a GRPO run jits it (the trainer's step around align.grpo's loss, the policy with a frozen
reference when grpo.kl_coef > 0 and no adapters), and the rollout's prefill and decode step on the
live policy, at rl.prompts_per_iteration (with dynamic sampling, a round's grpo.sampling_prompts) x
rl.samples_per_prompt rows. A step of this job is one iteration at one train step per rollout
(configs/align/grpo.py's design): the prefill, rl.max_new_tokens decode steps (the most a rollout
takes), the train step.

While the rollout runs, the whole train state stays in HBM: the decode programs' memory counts it
as resident (parameters, optimizer state and frozen weights), beside their own cache and
temporaries.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from align import grpo
from infer import aot as infer_aot
from model import sharding
from rundir import loading
from train import trainer
from train.aot import abstract, compile as compile_lib

_ROW_KEYS = ("tokens", "targets", "mask")  # int32 [B, T]
_ROW_FLOATS = ("old_logprobs",)  # float32 [B, T]
_SEQUENCE_FLOATS = ("advantages", "score")  # float32 [B]


def _batch(config: ml_collections.ConfigDict, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """GRPO's minibatch as align.grpo's collect builds it, placed over the batch axes."""
  rows = (config.batch_size, config.seq_len)
  row_sharding = NamedSharding(mesh, sharding.logical_to_spec(trainer.BATCH_AXES, rows, mesh, rules))
  seq_sharding = NamedSharding(mesh, sharding.logical_to_spec(("activation_batch",), rows[:1], mesh, rules))
  floats = (() if grpo.on_policy(config) else _ROW_FLOATS) + (("ref_logprobs",) if config.grpo.kl_coef > 0 else ())
  batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=row_sharding) for k in _ROW_KEYS}
  batch.update({k: jax.ShapeDtypeStruct(rows, jnp.float32, sharding=row_sharding) for k in floats})
  batch.update({k: jax.ShapeDtypeStruct(rows[:1], jnp.float32, sharding=seq_sharding) for k in _SEQUENCE_FLOATS})
  return batch


def programs(config: ml_collections.ConfigDict, devices) -> tuple[list, abstract.AbstractRun]:
  """[train step, rollout prefill, rollout decode step] of GRPO's `config` on `devices`."""
  _, make_decoder = abstract.decoder_factory(config)
  # A frozen copy of the starting policy only without adapters (with them, the base is the reference).
  with_reference = config.grpo.kl_coef > 0 and not loading.peft_on(config)

  def make_module():
    return grpo.PolicyWithReference(make_decoder(), make_decoder()) if with_reference else make_decoder()

  train, run = compile_lib.train_program(config, devices, loss_fn=grpo.loss_fn(config), make_module=make_module,
                                         decoder_path="decoder" if with_reference else "", batch_fn=_batch,
                                         name="train step")
  policy = abstract.abstract_module(make_decoder, run.mesh, run.rules)
  graphdef, params = nnx.split(policy)
  rl = config.rl
  rollout = infer_aot.decode_programs(
      graphdef, params, run.model_config, run.mesh, run.rules,
      batch_size=grpo.sampling_prompts(config) * rl.samples_per_prompt,
      prompt_len=config.seq_len - rl.max_new_tokens, max_new_tokens=rl.max_new_tokens)
  resident = {"optimizer state (resident)": run.state["opt_state"], "frozen weights (resident)": run.rest}
  prefill, decode_step = (_with_resident(p, resident) for p in rollout)
  # An iteration: the rollout (a prefill, then a decode step per new token), then the train step(s).
  return [train, prefill, dataclasses.replace(decode_step, repeats=rl.max_new_tokens)], run


def _with_resident(program, resident: dict):
  """`program` whose memory also counts `resident` arrays held in HBM beside its own arguments."""
  def lower():
    lowered, parts = program.lower()
    return lowered, {**parts, **resident}

  return dataclasses.replace(program, name=f"rollout {program.name}", lower=lower)
