"""A decoder (and its tokenizer) from a training run's workdir or a Hugging Face directory.

A run's workdir holds `tokenizer.model`, `config.json` (the resolved config) and `checkpoints/<step>/`
(orbax: state, data-iterator state, and the saved config with the architecture it trained,
`resolved_model`, and where the decoder sits inside a method's wrapper, `decoder_path`). A Hugging
Face directory holds `config.json`, `*.safetensors` and, for us, a sentencepiece `tokenizer.model`.

  module, tokenizer = rundir.load("runs/quickstart")               # a run: its latest checkpoint
  module, tokenizer = rundir.load("path/to/Llama-2-7b-hf", mesh=mesh)
  module, note = rundir.load_decoder(path, mesh=mesh, rules=rules)  # the weights alone (init_from)
"""

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

import model as model_lib
from model import hf, peft, sharding
from rundir import checkpoint as checkpoint_lib
from rundir.atomic import write_atomic
from rundir import tokenizer as tokenizer_lib

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"  # the trainer writes it when its loop ends: steps, tokens, FLOPs, losses, time, energy
TOKENIZER_FILE = tokenizer_lib.MODEL_FILENAME
# A method that wraps the decoder (a reward or value head, a frozen teacher) keeps the decoder at
# this attribute; the saved config records it, so loaders can take the decoder alone.
DECODER_ATTR = "decoder"
# Modules kept under an attribute of this name (PPO's reference policy, a distillation teacher) are
# never trained.
FROZEN_ATTR = "frozen"


def trainable(peft_on: bool, decoder_path: str = "", modules_to_save: tuple[str, ...] = ()):
  """The nnx filter of the parameters a run trains (and its checkpoints hold): every parameter
  outside `frozen`; with PEFT, only the adapters (model.peft.ADAPTER_NAMES), the base parameters
  of config.peft.modules_to_save, and what a method adds outside the decoder at `decoder_path` (a
  reward or value head)."""
  unfrozen = nnx.All(nnx.Param, nnx.Not(nnx.PathContains(FROZEN_ATTR)))
  if not peft_on:
    return unfrozen

  def adapter_or_head(path, value):
    outside_decoder = bool(decoder_path) and (not path or str(path[0]) != decoder_path)
    saved = bool(modules_to_save) and peft.is_saved_module_param(path, modules_to_save)
    return peft.is_adapter_param(path, value) or outside_decoder or saved

  return nnx.All(unfrozen, adapter_or_head)


def peft_on(saved_or_config) -> bool:
  """Whether a run's (saved) config trains adapters."""
  block = saved_or_config.get("peft") or {}
  return (block.get("method") or "none") != "none"


def run_trainable(saved_or_config, decoder_path: str = ""):
  """`trainable` for a run's (saved) config: its PEFT method and modules_to_save."""
  block = saved_or_config.get("peft") or {}
  if not peft_on(saved_or_config):
    return trainable(False, decoder_path)
  return trainable(True, decoder_path, peft.settings(block).modules_to_save)


def is_run(path: str | os.PathLike) -> bool:
  return (Path(path) / CHECKPOINTS).is_dir()


def is_huggingface(path: str | os.PathLike) -> bool:
  path = Path(path)
  return (path / CONFIG_FILE).is_file() and any(path.glob("*.safetensors"))


def saved_config(config: dict[str, Any], model_config: model_lib.ModelConfig, decoder_path: str) -> dict[str, Any]:
  """What a run keeps beside its checkpoints: the config, the architecture, where the decoder is."""
  return json.loads(json.dumps(
      {**config, "resolved_model": dataclasses.asdict(model_config), "decoder_path": decoder_path}, default=str))


def write_json_atomic(path: Path, value: Any) -> None:
  """`value` as JSON, written whole or not at all (rundir.atomic)."""
  write_atomic(path, json.dumps(value, indent=2, default=str))


def _not_a_source(path: Path, key: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"{key}={str(path)!r} is neither a training run's workdir (with {CHECKPOINTS}/) nor a Hugging Face "
      f"checkpoint directory (with {CONFIG_FILE} and *.safetensors)"
      + ("" if path.is_dir() else "; it does not exist or is not a directory")
  )


def restore_module(
    path: str | os.PathLike,
    build: Callable[[model_lib.ModelConfig], nnx.Module],
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    step: int | None = None,
    overrides: dict[str, Any] | None = None,
    decoder_only: bool = True,
) -> tuple[nnx.Module, str]:
  """`build(model_config)` with the parameters of a run's checkpoint (default: the latest).

  The parameters are read straight onto their shards (`mesh` and `rules`; without a mesh, the
  default device): no random init and no full unsharded copy ever exists.
  decoder_only: read the decoder alone out of a run that trained a wrapper (a reward model, a policy
  with a value head); False: the whole trained module (`build` must then make that wrapper).
  Returns the module and a note saying where it came from.
  """
  path = Path(path)
  source = checkpoint_lib.Checkpointer(path / CHECKPOINTS, keep=1_000_000, async_save=False, read_only=True)
  try:
    steps = source.all_steps()
    if not steps:
      raise FileNotFoundError(f"{path / CHECKPOINTS} holds no checkpoint yet")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"step={step} has no checkpoint in {path / CHECKPOINTS}; saved steps: {sorted(steps)}")
    saved = source.restore_config(step)
    if not saved.get("resolved_model"):
      raise ValueError(f"the checkpoint {path / CHECKPOINTS / str(step)} saved no resolved_model config")
    # The architecture the run trained (vocabulary included), as the trainer resumes it.
    config = model_lib.ModelConfig(**saved["resolved_model"]).replace(**(overrides or {}))
    decoder_path = saved.get("decoder_path", "")
    if peft_on(saved):
      return _restore_adapted(path, source, step, saved, build, config, mesh=mesh, rules=rules,
                              decoder_only=decoder_only)
    abstract = nnx.eval_shape(lambda: build(config))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise NotImplementedError(f"the model has non-parameter state {rest}; restoring it is not written yet")
    target = _target(abstract_params, mesh, rules)
    prefix = decoder_path if decoder_only else ""
    params = source.restore_params(step, target, prefix=prefix)
  finally:
    source.close()
  return nnx.merge(graphdef, params, rest), f"checkpoint {path} step {step}"


def _target(state: nnx.State, mesh, rules) -> nnx.State:
  """ShapeDtypeStructs with the shardings to restore `state` onto: a concrete array's own, else
  by its logical axes on `mesh` (without a mesh, the default device)."""
  if mesh is not None:
    by_axes = sharding.state_shardings(state, mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    by_axes = jax.tree.map(lambda v: v.replace(device), state, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def one(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if isinstance(x, jax.Array) else s)

  return jax.tree.map(one, state, by_axes)


def _restore_adapted(path, source, step, saved, build, config, *, mesh, rules, decoder_only):
  """A PEFT run's module: its base loaded again from the run's init_from (the checkpoint holds the
  adapters and heads only) with the run's own model config (`config`: what it trained, such as a
  RoPE extension or shifted sparse attention, with the caller's overrides on top), the run's
  adapters added, then the trained parameters restored."""
  if not saved.get("init_from"):
    raise ValueError(f"the PEFT run {path} saved no init_from: its base model is unknown")
  decoder, _ = load_decoder(saved["init_from"], mesh=mesh, rules=rules, overrides=dataclasses.asdict(config),
                            key=f"the init_from of {path}")
  with sharding.axis_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
    peft.add_adapters(decoder, saved["peft"], rngs=nnx.Rngs(saved.get("seed", 0)))
  decoder_path = saved.get("decoder_path", "")
  if decoder_only or not decoder_path:
    module, prefix, filter_path = decoder, decoder_path, ""
  else:  # the wrapper's own parts (a head) come from the checkpoint; its decoder is the one above
    module = nnx.eval_shape(lambda: build(config))
    setattr(module, decoder_path, decoder)
    prefix, filter_path = "", decoder_path
  graphdef, params, rest = nnx.split(module, run_trainable(saved, filter_path), ...)
  params = source.restore_params(step, _target(params, mesh, rules), prefix=prefix)
  return nnx.merge(graphdef, params, rest), f"checkpoint {path} step {step} (adapters on {saved['init_from']})"


def load_decoder(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
    step: int | None = None,
    overrides: dict[str, Any] | None = None,
    key: str = "path",
) -> tuple[model_lib.Transformer, str]:
  """A decoder with the weights of a run's checkpoint (of its decoder, when the run trained a
  wrapper) or of a Hugging Face directory; and a note saying which. `key` names the setting the
  path came from in errors (e.g. 'config.init_from')."""
  path = Path(path)
  overrides = overrides or {}
  if is_run(path):
    return restore_module(path, lambda c: model_lib.Transformer(c, rngs=nnx.Rngs(0)), mesh=mesh, rules=rules,
                          step=step, overrides=overrides)
  if is_huggingface(path):
    if step is not None:
      raise ValueError(f"step={step} was given, but {path} is a Hugging Face directory (it has no checkpoint steps)")
    return hf.from_pretrained(path, mesh=mesh, rules=rules, **overrides), f"huggingface {path}"
  raise _not_a_source(path, key)


def load_tokenizer(path: str | os.PathLike) -> tokenizer_lib.Tokenizer:
  """The sentencepiece tokenizer of a run's workdir or a Hugging Face directory."""
  path = Path(path)
  tokenizer_file = path / TOKENIZER_FILE
  if tokenizer_file.is_file():
    return tokenizer_lib.load_tokenizer(tokenizer_file)
  if is_run(path):
    raise FileNotFoundError(f"{tokenizer_file} does not exist; a run writes its tokenizer there when it starts")
  others = sorted(p.name for p in path.glob("tokenizer*") if p.is_file())
  raise FileNotFoundError(
      f"{path} has no {TOKENIZER_FILE}: only sentencepiece tokenizers ({TOKENIZER_FILE}) are supported"
      + (f" (found {others})" if others else "")
  )


def load(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules | None = None,
    step: int | None = None,
    **model_overrides: Any,
) -> tuple[model_lib.Transformer, tokenizer_lib.Tokenizer]:
  """(model, tokenizer) from a run's workdir (with checkpoints/) or a Hugging Face directory.

  mesh: place the parameters on it by `rules` (default model.sharding.DEFAULT_RULES); without
    one, on the default device. Generation then runs where the parameters are.
  step: a run's checkpoint step (default: the latest); not allowed for a Hugging Face directory.
  model_overrides: ModelConfig fields to change (dtype, attention_impl, scan_layers, ...).
  """
  path = Path(path)
  if not (is_run(path) or is_huggingface(path)):
    raise _not_a_source(path, "path")
  # Checked before the weights load: that may take minutes.
  tokenizer = load_tokenizer(path)
  module, note = load_decoder(path, mesh=mesh, rules=sharding.DEFAULT_RULES if rules is None else rules, step=step,
                              overrides=model_overrides)
  if module.config.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f"the model's vocab_size={module.config.vocab_size} ({note}) is smaller than its tokenizer's "
        f"{tokenizer.vocab_size} ({tokenizer.path})"
    )
  return module, tokenizer
