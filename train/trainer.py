"""The one trainer loop. Pre-training's next-token loss is its first user; every method in align/
plugs in its own `loss_fn(model, batch, rng) -> (loss, metrics)` and data.

`train(config, workdir)` sets up the mesh, tokenizer, data, model and optimizer, resumes from
the latest checkpoint in `workdir` if there is one, and runs the jitted step to
`config.total_steps`, logging metrics, evaluating on the held-out split and checkpointing.
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
from jax.sharding import NamedSharding

import model as model_lib
from configs import validation
from model import hf, sharding
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import distributed, losses, metrics as metrics_lib, optimizer as optimizer_lib
from train import step as step_lib
from train import tokenizer as tokenizer_lib

BATCH_AXES = ("activation_batch", "activation_length")
# What the optimizer updates: every parameter except those of a module kept under an attribute
# named `frozen` (PPO's reference policy, a distillation teacher), which ride in `Run.rest`.
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("frozen")))
# A method that wraps the decoder (a reward or value head, a frozen teacher) keeps the decoder at
# this attribute; checkpoints record it, so loaders can take the decoder alone.
DECODER_ATTR = "decoder"


# (config, tokenizer, *, split, **context) -> a grain IterDataset of this process's batches (dicts
# of [B, ...] arrays). context: `model`, the run's starting module (for 'train'; None for 'eval');
# `workdir`, the run's directory (for what a method computes once and keeps, e.g. DPO's
# reference); `live()`, the module with the current parameters (online methods sample from it
# between steps); `mesh` and `rules`, where the run's arrays live.
DatasetFn = Callable[..., Any]


def pretraining_dataset(config: ml_collections.ConfigDict, tokenizer, *, split: str, **context):
  """The default data: config.data's documents, packed by train/data.py."""
  del context
  return data_lib.make_dataset(
      config.data, tokenizer, split=split, seq_len=config.seq_len, global_batch_size=config.batch_size,
      seed=config.seed,
  )


class NonFiniteError(RuntimeError):
  """Too many non-finite losses or gradients in a row."""


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
  train_iter: Any
  checkpointer: checkpoint_lib.Checkpointer
  loss_fn: step_lib.LossFn
  make_dataset: "DatasetFn"
  train_step: Any
  eval_step: Any

  decoder_path: str = ""  # DECODER_ATTR when a method wrapped the decoder, else ''

  def model(self) -> nnx.Module:
    """The current model (parameters of the current state)."""
    return nnx.merge(self.graphdef, self.state["params"], self.rest)

  def policy(self) -> nnx.Module:
    """The current decoder: the model itself, or the decoder inside a method's wrapper."""
    module = self.model()
    return getattr(module, self.decoder_path) if self.decoder_path else module


def validate(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None) -> None:
  """Start-up checks: unknown keys, wrong types, impossible combinations, each naming the key."""
  from configs import common  # noqa: PLC0415 (configs imports train for its defaults)

  reference = common.train_config() if reference is None else reference
  validation.check_keys(config.to_dict(), reference.to_dict())
  for key in ("total_steps", "batch_size", "seq_len", "log_every", "keep_checkpoints", "grad_accum_steps"):
    if config[key] < 1:
      raise validation.ConfigError(f"config.{key}={config[key]} must be >= 1")
  for key in ("eval_every", "checkpoint_every", "eval_steps", "max_nonfinite_in_row"):
    if config[key] < 0:
      raise validation.ConfigError(f"config.{key}={config[key]} must be >= 0 (0 turns it off)")
  if config.batch_size % config.grad_accum_steps:
    raise validation.ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by config.grad_accum_steps={config.grad_accum_steps}"
    )
  validation.check_sharding_rules(config.sharding_rules)
  validation.build_model_config(config.model)


def _write_json_atomic(path: Path, value: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(value, indent=2, default=str))
  os.replace(tmp, path)


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


def restore_run_module(path: str | os.PathLike, build: Callable[[model_lib.ModelConfig], nnx.Module], mesh, rules, *,
                       overrides: dict[str, Any] | None = None, decoder_only: bool = True) -> tuple[nnx.Module, str]:
  """`build(model_config)` with the parameters of the latest checkpoint of the run in `path`, sharded.

  decoder_only: read the decoder alone out of a run that trained a wrapper (a reward model, a policy
  with a value head); False: the whole trained module (build must then make that wrapper).
  """
  run_dir = Path(path)
  source = checkpoint_lib.Checkpointer(run_dir / "checkpoints", keep=1_000_000, async_save=False, read_only=True)
  try:
    step = source.latest_step()
    if step is None:
      raise FileNotFoundError(f"{str(path)!r} has no checkpoint in {run_dir / 'checkpoints'}")
    saved = source.restore_config(step)
    model_config = model_lib.ModelConfig(**saved["resolved_model"]).replace(**(overrides or {}))
    module = sharding.create_sharded(lambda: build(model_config), mesh, rules)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    prefix = saved.get("decoder_path", "") if decoder_only else ""
    params = source.restore_params(step, checkpoint_lib.abstract_with_shardings(params), prefix=prefix)
  finally:
    source.close()
  return nnx.merge(graphdef, params, rest), f"checkpoint {run_dir} step {step}"


def load_decoder(path: str, mesh, rules, overrides: dict[str, Any]) -> tuple[nnx.Module, str]:
  """A decoder with the weights of a Hugging Face directory or of another run's latest checkpoint
  (of its decoder, when that run trained a wrapper such as a reward model or a policy with a value head)."""
  p = Path(path)
  if (p / "config.json").exists() and any(p.glob("*.safetensors")):
    return hf.from_pretrained(p, mesh=mesh, rules=rules, **overrides), "huggingface"
  if not (p / "checkpoints").is_dir():
    raise FileNotFoundError(
        f"config.init_from={path!r} is neither a Hugging Face directory (config.json + *.safetensors) "
        "nor a run's workdir (with checkpoints/)"
    )
  return restore_run_module(p, lambda c: model_lib.Transformer(c, rngs=nnx.Rngs(0)), mesh, rules, overrides=overrides)


def setup(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    loss_fn: step_lib.LossFn | None = None,
    make_dataset: DatasetFn | None = None,
    reference: ml_collections.ConfigDict | None = None,
    wrap_model: Callable[..., nnx.Module] | None = None,
) -> Run:
  """Builds a Run; a method (align/) brings its own loss_fn and make_dataset, the loop stays this one.

  reference: the config whose keys are the known ones (default: configs.common.train_config()).
  wrap_model(decoder, *, mesh, rules, seed, config, load) -> the module to train (a reward model's head
    on the decoder; a policy with a value head and a frozen reference), which keeps the decoder at
    `.decoder`; `load(path)` gives a fresh decoder from a Hugging Face directory or a run's workdir.
  """
  # ------------------------------------------------------------------ set up the processes and mesh
  validate(config, reference)
  distributed.initialize(config.distributed)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(validation.check_mesh(config.mesh, jax.device_count()))
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.sharding_rules)

  # ------------------------------------------------------------------ tokenizer and data
  tokenizer = tokenizer_lib.get_tokenizer(
      _tokenizer_config(config), workdir, lambda: data_lib.training_texts(config.data, seed=config.seed)
  )
  batch_shape = (config.batch_size, config.seq_len)
  batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(BATCH_AXES, batch_shape, mesh, rules))
  make_dataset = make_dataset or pretraining_dataset

  # ------------------------------------------------------------------ create the model, sharded
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
  latest = checkpointer.latest_step()
  with sharding.axis_rules(mesh, rules):
    init_note = "random init"
    if config.init_from and latest is None:
      overrides = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
      module, init_note = load_decoder(config.init_from, mesh, rules, overrides)
      model_config = module.config
    else:
      saved = checkpointer.restore_config(latest) if latest is not None else {}
      if saved.get("resolved_model"):  # the architecture the run began with
        model_config = model_lib.ModelConfig(**saved["resolved_model"])
      else:
        model_config = _model_config(config, tokenizer)
      module = sharding.create_sharded(lambda: model_lib.Transformer(model_config, rngs=nnx.Rngs(config.seed)), mesh, rules)
    decoder_path = ""
    if wrap_model is not None:  # e.g. a reward head on the decoder; built after init_from's weights load
      overrides = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
      load = lambda path, overrides=overrides: load_decoder(path, mesh, rules, overrides)[0]  # noqa: E731
      module = wrap_model(module, mesh=mesh, rules=rules, seed=config.seed, config=config, load=load)
      decoder_path = DECODER_ATTR if hasattr(module, DECODER_ATTR) else ""
    if model_config.vocab_size < tokenizer.vocab_size:
      raise validation.ConfigError(
          f"the model's vocab_size={model_config.vocab_size} ({init_note}) is smaller than the tokenizer's "
          f"{tokenizer.vocab_size} ({tokenizer.path}); give config.tokenizer.path the model's own tokenizer"
      )
    graphdef, params, rest = nnx.split(module, TRAINABLE, ...)
    # The data may depend on the starting weights (DPO's reference log-probs, computed once) or,
    # for online methods, on the current ones: `live` resolves to the Run once it exists.
    runs: list[Run] = []
    context = dict(model=module, workdir=workdir, live=lambda: runs[0].model(), mesh=mesh, rules=rules)
    train_iter = iter(data_lib.checkpointable(make_dataset(config, tokenizer, split="train", **context)))

    # ---------------------------------------------------------------- optimizer and state
    optimizer, schedule = optimizer_lib.make_optimizer(config.optimizer, config.total_steps)
    state = jax.jit(functools.partial(step_lib.init_state, optimizer=optimizer, seed=config.seed))(params)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    if latest is not None:
      state, data_state = checkpointer.restore(latest, checkpoint_lib.abstract_with_shardings(state))
      train_iter.set_state(data_state)
      init_note = f"resumed from step {latest}"
  logging.info("model: %s (%s), %d parameters", model_config, init_note, model_lib.param_count(model_config))

  # ------------------------------------------------------------------ the jitted steps
  loss_fn = loss_fn or functools.partial(losses.next_token_loss, z_loss=config.z_loss)
  train_step = jax.jit(
      step_lib.make_train_step(graphdef, loss_fn, optimizer, schedule, grad_accum_steps=config.grad_accum_steps),
      in_shardings=(state_shardings, None, None),  # rest keeps its placement; batches arrive placed by global_batch
      out_shardings=(state_shardings, None),
      donate_argnums=0,
  )
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, loss_fn), in_shardings=(state_shardings["params"], None, None))
  run = Run(
      config, workdir, mesh, rules, model_config, tokenizer, graphdef, rest, state, state_shardings, batch_sharding,
      train_iter, checkpointer, loss_fn, make_dataset, functools.partial(_with_rest, train_step, rest),
      functools.partial(_with_rest, eval_step, rest), decoder_path,
  )
  runs.append(run)
  if jax.process_index() == 0:
    _write_json_atomic(workdir / "config.json", _saved_config(run))
  return run


def _with_rest(step, rest, first, batch):
  """step(first, rest, batch): Run.train_step(state, batch) and Run.eval_step(params, batch)."""
  return step(first, rest, batch)


def _saved_config(run: Run) -> dict[str, Any]:
  """The resolved config kept beside the checkpoints: the config, the architecture, where the decoder is."""
  return {**run.config.to_dict(), "resolved_model": dataclasses.asdict(run.model_config),
          "decoder_path": run.decoder_path}


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
  dataset = run.make_dataset(run.config, run.tokenizer, split="eval", model=None, workdir=run.workdir,
                             live=run.model, mesh=run.mesh, rules=run.rules)
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
  config = json.loads(json.dumps(_saved_config(run), default=str))
  run.checkpointer.save(step, run.state, run.train_iter.get_state(), config)


def train_loop(run: Run, *, stop_at: int | None = None) -> dict[str, Any]:
  """Runs `run` to config.total_steps; returns the last logged and eval metrics.

  stop_at: stop after this step as a preemption would (checkpoint, then return), with the
  schedule still that of total_steps; a later `train` on the workdir carries on exactly.
  """
  c = run.config
  step = int(run.state["step"])
  writer = metrics_lib.MetricsWriter(run.workdir, total_steps=c.total_steps, initial_step=step)
  flops_per_token = model_lib.flops_per_token(run.model_config, c.seq_len)
  peak = metrics_lib.device_peak_flops()
  result: dict[str, Any] = {"step": step}
  pending: list[dict[str, jax.Array]] = []
  last_time, last_step = time.perf_counter(), step
  try:
    with _StopRequest() as stop, sharding.axis_rules(run.mesh, run.rules):
      while step < c.total_steps:
        batch = global_batch(run, next(run.train_iter))
        run.state, metrics = run.train_step(run.state, batch)
        step += 1
        pending.append(metrics)
        writer.advance()
        if c.max_nonfinite_in_row and int(run.state["nonfinite_in_row"]) >= c.max_nonfinite_in_row:
          raise NonFiniteError(
              f"{c.max_nonfinite_in_row} non-finite losses or gradients in a row at step {step}; stopping. "
              f"The last good checkpoint is kept in {run.checkpointer.directory}"
          )
        if step % c.log_every == 0 or step == c.total_steps:
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
          writer.write(step, logged)
          result.update(logged, step=step)
          pending, last_time, last_step = [], time.perf_counter(), step
        if c.eval_every and (step % c.eval_every == 0 or step == c.total_steps):
          eval_metrics = evaluate(run)
          writer.write(step, eval_metrics, prefix="eval_")
          result.update({f"eval_{k}": v for k, v in eval_metrics.items()})
          last_time = time.perf_counter()  # evaluation time is not training throughput
        if stop_at is not None and step >= stop_at:
          stop.requested = True
        if (c.checkpoint_every and step % c.checkpoint_every == 0) or step == c.total_steps or stop.requested:
          _save(run, step)
        if stop.requested:
          result["stopped_early"] = True
          break
  finally:
    run.checkpointer.close()
    writer.close()
  return result


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
