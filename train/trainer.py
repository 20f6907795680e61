"""The one trainer loop. Pre-training's next-token loss is its first user; every method in align/
plugs in its own `loss_fn(model, batch, rng) -> (loss, metrics)` and data.

`train(config, workdir)` sets up the mesh, tokenizer, data, model and optimizer, resumes from
the latest checkpoint in `workdir` if there is one, and runs the jitted step to
`config.total_steps`, logging metrics, evaluating on the held-out split and checkpointing.

A method's data may ask for a restart: a batch that carries the key RESTART (its value unread) is
trained on from the run's starting parameters and a new run's optimizer state (`restart`), as
when fine-tuning starts over from the base model (STaR). The request travels with the data, so a
resumed run meets it at the very step a straight run did.

What a run computes is counted in FLOPs (train/flops.py): each step batch_size x the method's FLOPs
per batch row (`row_flops`), plus what was computed to make its batches, which a batch reports under
the key FLOPS (an online method's rollout, on the first minibatch it made); the running total of
the latter is saved with the data iterator's state, so a resumed run counts on exactly.
"""

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

import model as model_lib
import rundir
from configs import common, validation
from model import peft, sharding
from rundir import checkpoint as checkpoint_lib
from rundir import loading
from rundir import tokenizer as tokenizer_lib
from train import data as data_lib
from train import distributed, losses, metrics as metrics_lib, optimizer as optimizer_lib
from train import flops as flops_lib
from train import step as step_lib

BATCH_AXES = ("activation_batch", "activation_length")
SUMMARY_FILE = loading.SUMMARY_FILE
RESTART = "restart"  # a batch key: restart from the starting parameters before this step (see `restart`)
FLOPS = "flops"  # a batch key: FLOPs computed outside the train step to make it (all processes' rows)
_MADE_FLOPS = "flops_outside_steps"  # the checkpoint's data state: FLOPS summed over the batches trained on
FLOPS_NOTE = ("model FLOPs (model.flops_per_token's count: matmuls and full-square attention) of every train "
              "step and of what made its batches (generation, frozen and reward-model forwards; train/flops.py); "
              "evaluation is not counted")
# What the optimizer updates: every parameter except those of a module kept under an attribute
# named `frozen` (PPO's reference policy, a distillation teacher), which ride in `Run.rest`; with
# config.peft, only the adapters and a method's heads (rundir.loading.trainable).
TRAINABLE = loading.trainable(False)
DECODER_ATTR = loading.DECODER_ATTR


@dataclasses.dataclass(frozen=True)
class DataContext:
  """What a method's data may read besides the config and the tokenizer."""

  workdir: Path  # the run's directory: what a method computes once and keeps (DPO's reference log-probs)
  mesh: jax.sharding.Mesh  # where the run's arrays live
  rules: sharding.Rules
  start: nnx.Module | None = None  # the run's starting module (the 'train' split only)
  live: Callable[[], nnx.Module] | None = None  # the current model: online methods sample from it between steps


# make_dataset(config, tokenizer, *, split, context: DataContext) -> a grain IterDataset of this
# process's batches (dicts of [B, ...] arrays).
DatasetFn = Callable[..., Any]
# row_flops(config, module) -> the train step's FLOPs per batch row of the trained module (the
# decoder or a method's wrapper): its trained and frozen passes (train/flops.py).
RowFlopsFn = Callable[[ml_collections.ConfigDict, nnx.Module], float]


def one_sequence(config: ml_collections.ConfigDict, module: nnx.Module) -> float:
  """The default row: one sequence of config.seq_len tokens through the model, forward and backward."""
  return flops_lib.trained(module.config, config.seq_len)


def pretraining_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, context: DataContext):
  """The default data: config.data's documents, packed by train/data.py."""
  del context
  return data_lib.make_dataset(
      config.data, tokenizer, split=split, seq_len=config.seq_len, global_batch_size=config.batch_size,
      seed=config.seed,
  )


class NonFiniteError(RuntimeError):
  """Too many non-finite losses or gradients in a row."""


@dataclasses.dataclass(frozen=True)
class Measure:
  """Scores of the live run that the loop records beside its held-out loss: `fn(run)` at step 0 of a new run
  (with at_start), every `every` steps and at the last, written to the metrics as `eval_<name>` records (so `train.plot`
  draws them against step or wall time). Its time is not training time."""

  every: int
  fn: Callable[["Run"], dict[str, float]]
  at_start: bool = True

  def __post_init__(self):
    if self.every <= 0:
      raise ValueError(f"Measure.every={self.every} must be a positive number of steps")


@dataclasses.dataclass
class Run:
  """What `setup` builds; a notebook can use the pieces directly."""

  config: ml_collections.ConfigDict
  workdir: Path
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  model_config: model_lib.ModelConfig
  tokenizer: Any
  graphdef: nnx.GraphDef
  rest: nnx.State
  state: dict[str, Any]
  state_shardings: Any
  batch_sharding: NamedSharding
  checkpointer: checkpoint_lib.Checkpointer
  loss_fn: step_lib.LossFn
  make_dataset: DatasetFn
  train_step: Any  # (state, batch) -> (state, metrics)
  eval_step: Any  # (params, batch) -> (weighted loss sum, weight)
  init_state: Any  # params -> a new run's state (step 0, fresh optimizer state), placed on the mesh
  starting_params: Callable[[], nnx.State]  # the trainable parameters a new run starts from, built again
  decoder_path: str = ""  # DECODER_ATTR when a method wrapped the decoder, else ''
  train_iter: Any = None  # the checkpointable iterator of the train split (set once the Run exists)
  flops_per_step: float = 0.0  # the train step's: batch_size x row_flops
  made_flops: float = 0.0  # FLOPS of the batches trained on so far (rollouts)
  flops_note: str = FLOPS_NOTE

  def model(self) -> nnx.Module:
    """The current model (parameters of the current state)."""
    return nnx.merge(self.graphdef, self.state["params"], self.rest)

  def policy(self) -> nnx.Module:
    """The current decoder: the model itself, or the decoder inside a method's wrapper."""
    module = self.model()
    return getattr(module, self.decoder_path) if self.decoder_path else module


def validate(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None) -> None:
  """Start-up checks: unknown keys, wrong types, impossible combinations, each naming the key."""
  reference = common.train_config() if reference is None else reference
  validation.check_keys(config.to_dict(), reference.to_dict())
  for key in ("total_steps", "batch_size", "seq_len", "log_every", "keep_checkpoints", "grad_accum_steps"):
    if config[key] < 1:
      raise validation.ConfigError(f"config.{key}={config[key]} must be >= 1")
  for key in ("eval_every", "checkpoint_every", "eval_steps", "max_nonfinite_in_row", "device_power_watts",
              "max_train_seconds"):
    if config[key] < 0:
      raise validation.ConfigError(f"config.{key}={config[key]} must be >= 0 (0 turns it off)")
  if config.batch_size % config.grad_accum_steps:
    raise validation.ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by config.grad_accum_steps={config.grad_accum_steps}"
    )
  validation.check_sharding_rules(config.sharding_rules)
  validation.build_model_config(config.model)
  try:
    method = peft.settings(config.peft).method
  except ValueError as e:
    raise validation.ConfigError(str(e)) from e
  if method != "none" and not config.init_from:
    raise validation.ConfigError(f"config.peft.method={method!r} trains adapters on a base model: set config.init_from "
                                 "(a Hugging Face directory or a run's workdir)")
  try:  # the optimizer and schedule's own checks, before anything is built
    optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
  except ValueError as e:
    raise validation.ConfigError(str(e)) from e


def _model_config(config, tokenizer) -> model_lib.ModelConfig:
  """The preset with overrides; from scratch, the vocabulary is the tokenizer's unless overridden."""
  model_config = validation.build_model_config(config.model)
  if config.model.vocab_size is None:
    model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
  return model_config


def _tokenizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.tokenizer; fine-tuning without a tokenizer path takes the one beside init_from's weights."""
  candidate = Path(config.init_from) / tokenizer_lib.MODEL_FILENAME if config.init_from else None
  if config.tokenizer.path or candidate is None or not candidate.is_file():
    return config.tokenizer
  tokenizer_config = ml_collections.ConfigDict(config.tokenizer.to_dict())
  tokenizer_config.path = str(candidate)
  return tokenizer_config


def mesh_and_rules(config: ml_collections.ConfigDict, devices=None) -> tuple[jax.sharding.Mesh, sharding.Rules]:
  """config.mesh over `devices` (default: all of this job's), and config.sharding_rules."""
  devices = jax.devices() if devices is None else devices
  mesh = sharding.make_mesh(validation.check_mesh(config.mesh, len(devices)), devices)
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.sharding_rules)
  return mesh, rules


def _load_merged(path, mesh, rules, overrides, *, key: str = "path") -> tuple[nnx.Module, str]:
  """A decoder to start from: a run's or a Hugging Face directory's; a PEFT run's with its adapters
  merged into its weights (the new run's base is what that run trained)."""
  decoder, note = rundir.load_decoder(path, mesh=mesh, rules=rules, overrides=overrides, key=key)
  if peft.has_adapters(decoder):
    decoder, note = peft.merge(decoder), f"{note}, adapters merged"
  return decoder, note


def _starting_module(config, tokenizer, saved: dict, mesh, rules) -> tuple[nnx.Module, str]:
  """The decoder a run starts from: init_from's weights (a new run), else a random init of the
  architecture the run began with (its saved config) or of config.model. With config.peft the base
  always comes from init_from (checkpoints hold the adapters only), and the adapters are added to it
  (initialised from config.seed; a resumed run then restores them)."""
  overrides = validation.set_model_fields(config.model)
  if loading.peft_on(config):
    decoder, note = _load_merged(config.init_from, mesh, rules, overrides, key="config.init_from")
    try:
      peft.add_adapters(decoder, config.peft, rngs=nnx.Rngs(config.seed))
    except ValueError as e:  # a target, block or group size this model cannot take
      raise validation.ConfigError(f"{e} ({note})") from e
    return decoder, f"{note}, {config.peft.method} adapters"
  if config.init_from and not saved:
    return _load_merged(config.init_from, mesh, rules, overrides, key="config.init_from")
  if saved.get("resolved_model"):
    model_config = model_lib.ModelConfig(**saved["resolved_model"])
  else:
    model_config = _model_config(config, tokenizer)
  module = sharding.create_sharded(lambda: model_lib.Transformer(model_config, rngs=nnx.Rngs(config.seed)), mesh, rules)
  return module, "random init"


def _wrapped(decoder: nnx.Module, wrap_model, config, mesh, rules) -> tuple[nnx.Module, str]:
  """The module a method trains around the decoder (a reward head, a frozen reference), built after
  init_from's weights load, and the attribute that holds the decoder ('' when not wrapped)."""
  if wrap_model is None:
    return decoder, ""
  overrides = validation.set_model_fields(config.model)

  def load(path, overrides=overrides):
    return _load_merged(path, mesh, rules, overrides)[0]

  module = wrap_model(decoder, mesh=mesh, rules=rules, seed=config.seed, config=config, load=load)
  return module, (DECODER_ATTR if hasattr(module, DECODER_ATTR) else "")


def setup(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    loss_fn: step_lib.LossFn | None = None,
    make_dataset: DatasetFn | None = None,
    reference: ml_collections.ConfigDict | None = None,
    wrap_model: Callable[..., nnx.Module] | None = None,
    row_flops: RowFlopsFn = one_sequence,
    flops_note: str = "",
) -> Run:
  """Builds a Run; a method (align/) brings its own loss_fn and make_dataset, the loop stays this one.

  reference: the config whose keys are the known ones (default: configs.common.train_config()).
  wrap_model(decoder, *, mesh, rules, seed, config, load) -> the module to train (a reward model's head
    on the decoder; a policy with a value head and a frozen reference), which keeps the decoder at
    `.decoder`; `load(path)` gives a fresh decoder from a Hugging Face directory or a run's workdir.
  row_flops(config, module) -> the train step's FLOPs per batch row (default: one sequence);
    flops_note: what the method's count approximates, appended to summary.json's flops_note.
  """
  # ------------------------------------------------------------------ set up the processes and mesh
  validate(config, reference)
  distributed.initialize(config.distributed)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh, rules = mesh_and_rules(config)

  # ------------------------------------------------------------------ tokenizer
  tokenizer = tokenizer_lib.get_tokenizer(
      _tokenizer_config(config), workdir, lambda: data_lib.training_texts(config.data, seed=config.seed)
  )
  batch_shape = (config.batch_size, config.seq_len)
  batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(BATCH_AXES, batch_shape, mesh, rules))

  # ------------------------------------------------------------------ create the model, sharded
  checkpointer = checkpoint_lib.Checkpointer(workdir / loading.CHECKPOINTS, keep=config.keep_checkpoints)
  latest = checkpointer.latest_step()
  saved = checkpointer.restore_config(latest) if latest is not None else {}
  with sharding.axis_rules(mesh, rules):
    decoder, init_note = _starting_module(config, tokenizer, saved, mesh, rules)
    model_config = decoder.config
    module, decoder_path = _wrapped(decoder, wrap_model, config, mesh, rules)
    if model_config.vocab_size < tokenizer.vocab_size:
      raise validation.ConfigError(
          f"the model's vocab_size={model_config.vocab_size} ({init_note}) is smaller than the tokenizer's "
          f"{tokenizer.vocab_size} ({tokenizer.path}); give config.tokenizer.path the model's own tokenizer"
      )
    graphdef, params, rest = nnx.split(module, loading.run_trainable(config, decoder_path), ...)

    # ---------------------------------------------------------------- optimizer and state
    optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    state_shardings = step_lib.state_shardings(params, optimizer, mesh)
    init_state = jax.jit(functools.partial(step_lib.init_state, optimizer=optimizer, seed=config.seed),
                         out_shardings=state_shardings)
    state = init_state(params)
    data_state, made_flops = None, 0.0
    if latest is not None:
      state, data_state = checkpointer.restore(latest, checkpoint_lib.abstract_with_shardings(state))
      made_flops = float(data_state.pop(_MADE_FLOPS, 0.0))
      init_note = f"resumed from step {latest}"
  logging.info("model: %s (%s), %d parameters", model_config, init_note, model_lib.param_count(model_config))

  # ------------------------------------------------------------------ the jitted steps
  loss_fn = loss_fn or functools.partial(losses.next_token_loss, z_loss=config.z_loss)
  train_step = jit_train_step(graphdef, loss_fn, optimizer, schedule, config, state_shardings)
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, loss_fn), in_shardings=(state_shardings["params"], None, None))
  run = Run(
      config=config, workdir=workdir, mesh=mesh, rules=rules, model_config=model_config, tokenizer=tokenizer,
      graphdef=graphdef, rest=rest, state=state, state_shardings=state_shardings, batch_sharding=batch_sharding,
      checkpointer=checkpointer, loss_fn=loss_fn, make_dataset=make_dataset or pretraining_dataset,
      train_step=functools.partial(_with_rest, train_step, rest), eval_step=functools.partial(_with_rest, eval_step, rest),
      init_state=init_state, decoder_path=decoder_path,
      starting_params=functools.partial(_starting_params, config, tokenizer, mesh, rules, wrap_model, decoder_path),
      flops_per_step=config.batch_size * row_flops(config, module), made_flops=made_flops,
      flops_note=f"{FLOPS_NOTE}; {flops_note}" if flops_note else FLOPS_NOTE,
  )

  # ------------------------------------------------------------------ data
  # It may depend on the starting weights (DPO's reference log-probs, computed once) or, for online
  # methods, on the current ones (run.model, read when a batch is made).
  context = DataContext(workdir=workdir, mesh=mesh, rules=rules, start=module, live=run.model)
  with sharding.axis_rules(mesh, rules):
    run.train_iter = iter(data_lib.checkpointable(run.make_dataset(config, tokenizer, split="train", context=context)))
    if data_state is not None:
      run.train_iter.set_state(data_state)
  if jax.process_index() == 0:
    loading.write_json_atomic(workdir / loading.CONFIG_FILE, _saved_config(run))
  return run


def _starting_params(config, tokenizer, mesh, rules, wrap_model, decoder_path) -> nnx.State:
  """The trainable parameters of a new run of `config`, built as setup builds them (init_from's
  weights or config.seed's random init, the method's wrapper, new adapters): on a resumed run too,
  whose own starting module is only a template for the restored state."""
  with sharding.axis_rules(mesh, rules):
    decoder, _ = _starting_module(config, tokenizer, {}, mesh, rules)
    module, _ = _wrapped(decoder, wrap_model, config, mesh, rules)
    _, params, _ = nnx.split(module, loading.run_trainable(config, decoder_path), ...)
  return params


def restart(run: Run) -> None:
  """Puts the parameters back to the run's starting ones and the optimizer state to a new run's
  (its step count too, so the learning-rate schedule starts over); the run's step, rng and
  non-finite counters go on. What a batch carrying RESTART asks for."""
  fresh = run.init_state(run.starting_params())
  run.state = {**run.state, "params": fresh["params"], "opt_state": fresh["opt_state"]}


def jit_train_step(graphdef, loss_fn, optimizer, schedule, config, state_shardings):
  """The jitted train step `(state, rest, batch) -> (state, metrics)`, as every run (and train.aot) compiles it."""
  return jax.jit(
      step_lib.make_train_step(graphdef, loss_fn, optimizer, schedule, grad_accum_steps=config.grad_accum_steps),
      in_shardings=(state_shardings, None, None),  # rest keeps its placement; batches arrive placed by global_batch
      out_shardings=(state_shardings, None),
      donate_argnums=0,
  )


def _with_rest(step, rest, first, batch):
  """step(first, rest, batch): Run.train_step(state, batch) and Run.eval_step(params, batch)."""
  return step(first, rest, batch)


def _saved_config(run: Run) -> dict[str, Any]:
  """The run's saved config, with its train step's FLOPs (for flops_at)."""
  return {**loading.saved_config(run.config.to_dict(), run.model_config, run.decoder_path),
          "flops_per_step": run.flops_per_step}


def flops_at(workdir: str | os.PathLike, step: int) -> float | None:
  """The flops_seen of the run in `workdir` at its checkpoint `step`, as its train loop counted it
  (0 at step 0); None for a run that did not save its count (from before the count was kept)."""
  saved = json.loads((Path(workdir) / loading.CONFIG_FILE).read_text())
  if "flops_per_step" not in saved:
    return None
  if step == 0:
    return 0.0
  checkpointer = checkpoint_lib.Checkpointer(Path(workdir) / loading.CHECKPOINTS, keep=1, read_only=True)
  try:
    made = float(checkpointer.restore_data(step).get(_MADE_FLOPS, 0.0))
  finally:
    checkpointer.close()
  return step * saved["flops_per_step"] + made


def global_batch(run: Run, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows -> arrays of the global batch, sharded on the mesh."""
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    shape = (run.config.batch_size, *value.shape[1:])  # global: this process holds 1 / process_count of the rows
    if value.ndim == 2:
      placement = run.batch_sharding
    else:  # per-example values [B] (DPO's reference log-probs) or wider rows: batch axis only
      axes = ("activation_batch",) + (None,) * (value.ndim - 1)
      placement = NamedSharding(run.mesh, sharding.logical_to_spec(axes, shape, run.mesh, run.rules))
    out[key] = jax.make_array_from_process_local_data(placement, value, shape)
  return out


def evaluate(run: Run) -> dict[str, float]:
  """Loss and perplexity over the held-out split (at most config.eval_steps batches; 0: all of it)."""
  context = DataContext(workdir=run.workdir, mesh=run.mesh, rules=run.rules, live=run.model)
  dataset = run.make_dataset(run.config, run.tokenizer, split="eval", context=context)
  total, weight = 0.0, 0.0
  with sharding.axis_rules(run.mesh, run.rules):
    for i, local in enumerate(dataset):
      if run.config.eval_steps and i >= run.config.eval_steps:
        break
      loss_sum, w = run.eval_step(run.state["params"], global_batch(run, local))
      total, weight = total + float(loss_sum), weight + float(w)
  if weight == 0:
    raise ValueError("the held-out split produced no tokens; give config.data more held-out text")
  loss = total / weight
  return {"loss": loss, "perplexity": math.exp(min(loss, 80.0))}


class _StopRequest:
  """SIGTERM / SIGINT (preemption) ask the loop to save a checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint and stopping", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _save(run: Run, step: int) -> None:
  data_state = {**run.train_iter.get_state(), _MADE_FLOPS: run.made_flops}
  run.checkpointer.save(step, run.state, data_state, _saved_config(run))


def _budget_spent(config: ml_collections.ConfigDict, seconds: float) -> bool:
  """Whether config.max_train_seconds is spent; process 0 decides for all, so every process stops at one step."""
  if not config.max_train_seconds:
    return False
  spent = seconds >= config.max_train_seconds
  if jax.process_count() > 1:
    spent = bool(multihost_utils.broadcast_one_to_all(np.asarray(spent)))
  return spent


def train_loop(run: Run, *, stop_at: int | None = None, measure: Measure | None = None) -> dict[str, Any]:
  """Runs `run` to config.total_steps; returns the last logged and eval metrics.

  stop_at: stop after this step as a preemption would (checkpoint, then return), with the
  schedule still that of total_steps; a later `train` on the workdir carries on exactly.
  measure: scores recorded along the way (see Measure); the last are in the result as eval_<name>.
  """
  c = run.config
  step = first_step = int(run.state["step"])
  writer = metrics_lib.MetricsWriter(run.workdir, total_steps=c.total_steps, initial_step=step)
  flops_per_token = model_lib.flops_per_token(run.model_config, c.seq_len)
  peak = metrics_lib.device_peak_flops()
  watts = metrics_lib.device_power_watts(c.device_power_watts)
  result: dict[str, Any] = {"step": step}
  pending: list[dict[str, jax.Array]] = []
  last_time, last_step = time.perf_counter(), step
  wall = metrics_lib.last_value(run.workdir, "wall_seconds", up_to_step=step)  # training time, evaluation excluded

  def record_measure() -> None:
    scores = measure.fn(run)
    writer.write(step, scores, prefix="eval_")
    result.update({f"eval_{k}": v for k, v in scores.items()})

  try:
    with _StopRequest() as stop, sharding.axis_rules(run.mesh, run.rules):
      if measure is not None and measure.at_start and step == 0:
        record_measure()
        last_time = time.perf_counter()
      while step < c.total_steps:
        local = next(run.train_iter)
        if local.pop(RESTART, None) is not None:
          restart(run)
        run.made_flops += float(local.pop(FLOPS, 0.0))
        batch = global_batch(run, local)
        run.state, metrics = run.train_step(run.state, batch)
        step += 1
        pending.append(metrics)
        writer.advance()
        if c.max_nonfinite_in_row and int(run.state["nonfinite_in_row"]) >= c.max_nonfinite_in_row:
          raise NonFiniteError(
              f"{c.max_nonfinite_in_row} non-finite losses or gradients in a row at step {step}; stopping. "
              f"The last good checkpoint is kept in {run.checkpointer.directory}"
          )
        # The last step of the run: its total, or the first step past the wall-time budget (on several
        # processes, the first logged step: they agree there).
        last = step == c.total_steps or ((jax.process_count() == 1 or step % c.log_every == 0) and
                                         _budget_spent(c, wall + time.perf_counter() - last_time))
        if step % c.log_every == 0 or last:
          values = jax.device_get(pending)
          now = time.perf_counter()
          logged = {k: float(np.mean([m[k] for m in values])) for k in values[-1] if k not in ("tokens",)}
          tokens_per_second = sum(float(m["tokens"]) for m in values) / (now - last_time)
          logged.update(
              tokens_per_second=tokens_per_second,
              steps_per_second=(step - last_step) / (now - last_time),
              skipped_total=float(run.state["nonfinite_total"]),
          )
          if peak:
            logged["mfu"] = flops_per_token * tokens_per_second / (peak * jax.device_count())
          wall += now - last_time
          logged.update(_cumulative(run, step, wall, watts))
          writer.write(step, logged)
          result.update(logged, step=step)
          pending, last_time, last_step = [], time.perf_counter(), step
        if c.eval_every and (step % c.eval_every == 0 or last):
          eval_metrics = evaluate(run)
          writer.write(step, eval_metrics, prefix="eval_")
          result.update({f"eval_{k}": v for k, v in eval_metrics.items()}, eval_step=step)
          last_time = time.perf_counter()  # evaluation time is not training throughput
        if measure is not None and (step % measure.every == 0 or last):
          record_measure()
          last_time = time.perf_counter()
        if stop_at is not None and step >= stop_at:
          stop.requested = True
        if (c.checkpoint_every and step % c.checkpoint_every == 0) or last or stop.requested:
          _save(run, step)
        if last and step < c.total_steps:
          logging.info("stopping at step %d: %.0f s of training spent (config.max_train_seconds)", step, wall)
          result["stopped_at_budget"] = True
          break
        if stop.requested:
          result["stopped_early"] = True
          break
  finally:
    run.checkpointer.close()
    writer.close()
  if jax.process_index() == 0 and (int(run.state["step"]) > first_step or not (run.workdir / SUMMARY_FILE).exists()):
    loading.write_json_atomic(run.workdir / SUMMARY_FILE, _summary(run, result, flops_per_token, wall, watts))
  return result


def _cumulative(run: Run, step: int, wall: float, watts: float | None) -> dict[str, float]:
  """What the run has spent up to `step`: tokens trained on (batch rows x seq_len, padding included:
  it is computed on), FLOPs (the steps' and their batches' making: run.flops_note), training wall
  time and its energy estimate."""
  c = run.config
  out = {"tokens_seen": float(step * c.batch_size * c.seq_len), "flops_seen": step * run.flops_per_step + run.made_flops,
         "wall_seconds": wall}
  energy = metrics_lib.energy_kwh(watts, jax.device_count(), wall)
  if energy is not None:
    out["energy_kwh"] = energy
  return out


def _summary(run: Run, result: dict[str, Any], flops_per_token: float, wall: float, watts: float | None) -> dict:
  """workdir/summary.json: where the run ended and what it cost (the sweep's record of a finished point)."""
  c, step = run.config, int(run.state["step"])
  spent = _cumulative(run, step, wall, watts)
  return {
      "step": step, "total_steps": c.total_steps, "completed": step >= c.total_steps,
      "tokens": spent["tokens_seen"], "flops": spent["flops_seen"], "flops_per_token": flops_per_token,
      "flops_per_step": run.flops_per_step, "flops_note": run.flops_note,
      "params": model_lib.param_count(run.model_config),
      "non_embedding_params": model_lib.non_embedding_param_count(run.model_config),
      "train_loss": result.get("loss"), "eval_loss": result.get("eval_loss"), "eval_step": result.get("eval_step"),
      "wall_seconds": wall, "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
      "device_power_watts": watts, "energy_kwh": spent.get("energy_kwh"), "energy_note": metrics_lib.ENERGY_NOTE,
  }


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    loss_fn: step_lib.LossFn | None = None,
    make_dataset: DatasetFn | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  run = setup(config, workdir, loss_fn=loss_fn, make_dataset=make_dataset)
  result = train_loop(run)
  if jax.process_index() == 0:
    where = run.checkpointer.directory
    if "eval_perplexity" in result:
      print(f"held-out loss {result['eval_loss']:.4f}, perplexity {result['eval_perplexity']:.2f} at step {result['step']}")
    print(f"checkpoints: {where} (latest step {result['step']})")
  result["run"] = run
  return result
