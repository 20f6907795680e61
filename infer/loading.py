"""A model and its tokenizer from a training run's workdir or a Hugging Face directory.

`load(path)` is what a notebook or `python -m infer` starts from:

  module, tokenizer = infer.loading.load("runs/quickstart")             # a run: its latest checkpoint
  module, tokenizer = infer.loading.load("path/to/Llama-2-7b-hf", mesh=mesh)

This is the one place in infer/ that imports train/: a run's checkpoint layout (orbax, via
train.checkpoint) and its tokenizer (sentencepiece, train.tokenizer) are train's. The imports are
made inside the functions, so `import infer` stays independent of train (DESIGN.md: infer
imports model).
"""

import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

import model as model_lib
from model import hf, sharding

CHECKPOINTS = "checkpoints"  # train.trainer.setup keeps a run's orbax checkpoints here
HF_TOKENIZER = "tokenizer.model"


def load(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules | None = None,
    step: int | None = None,
    **model_overrides: Any,
) -> tuple[model_lib.Transformer, Any]:
  """(model, tokenizer) from a run's workdir (with checkpoints/) or a Hugging Face directory.

  mesh: place the parameters on it by `rules` (default model.sharding.DEFAULT_RULES); without
    one, on the default device. Generation then runs where the parameters are.
  step: a run's checkpoint step (default: the latest); not allowed for a Hugging Face directory.
  model_overrides: ModelConfig fields to change (dtype, attention_impl, scan_layers, ...).
  The tokenizer is train.tokenizer.Tokenizer (encode, decode, bos_id, eos_id).
  """
  path = Path(path)
  rules = sharding.DEFAULT_RULES if rules is None else rules
  # A run's workdir also holds a config.json (the resolved config), so look for checkpoints first.
  if (path / CHECKPOINTS).is_dir():
    return _load_run(path, mesh=mesh, rules=rules, step=step, overrides=model_overrides)
  if (path / "config.json").is_file():
    if step is not None:
      raise ValueError(f"step={step} was given, but {path} is a Hugging Face directory (it has no checkpoint steps)")
    return _load_hf(path, mesh=mesh, rules=rules, overrides=model_overrides)
  raise ValueError(
      f"{str(path)!r} is neither a training run's workdir (with {CHECKPOINTS}/) nor a Hugging Face "
      "checkpoint directory (with config.json and *.safetensors)"
      + ("" if path.is_dir() else "; it does not exist or is not a directory")
  )


def _load_hf(path: Path, *, mesh, rules, overrides) -> tuple[model_lib.Transformer, Any]:
  from train import tokenizer as tokenizer_lib  # noqa: PLC0415 (see the module docstring)

  tokenizer_file = path / HF_TOKENIZER
  if not tokenizer_file.is_file():  # checked before the weights load: that may take minutes
    others = sorted(p.name for p in path.glob("tokenizer*") if p.is_file())
    raise FileNotFoundError(
        f"{path} has no {HF_TOKENIZER}: only sentencepiece tokenizers ({HF_TOKENIZER}) are supported"
        + (f" (found {others})" if others else "")
    )
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_file)
  module = hf.from_pretrained(path, mesh=mesh, rules=rules, **overrides)
  _check_vocab(module.config, tokenizer, str(path))
  return module, tokenizer


def _load_run(path: Path, *, mesh, rules, step, overrides) -> tuple[model_lib.Transformer, Any]:
  from train import checkpoint as checkpoint_lib  # noqa: PLC0415 (see the module docstring)
  from train import tokenizer as tokenizer_lib  # noqa: PLC0415

  tokenizer_file = path / tokenizer_lib.MODEL_FILENAME
  if not tokenizer_file.is_file():
    raise FileNotFoundError(f"{tokenizer_file} does not exist; a run writes its tokenizer there when it starts")
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_file)

  checkpointer = checkpoint_lib.Checkpointer(path / CHECKPOINTS, keep=1_000_000, async_save=False, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"{path / CHECKPOINTS} holds no checkpoint yet")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise ValueError(f"step={step} has no checkpoint in {path / CHECKPOINTS}; saved steps: {sorted(steps)}")
    saved = checkpointer.restore_config(step)
    if not saved.get("resolved_model"):
      raise ValueError(f"the checkpoint {path / CHECKPOINTS / str(step)} saved no resolved_model config")
    # The architecture the run trained (vocabulary included), as the trainer resumes it.
    config = model_lib.ModelConfig(**saved["resolved_model"]).replace(**overrides)

    # Abstract parameters carrying their target shardings: orbax reads each shard straight onto
    # its device, so no full unsharded copy (and no random init) ever exists.
    abstract = nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise NotImplementedError(f"the model has non-parameter state {rest}; restoring it is not written yet")
    if mesh is not None:
      shardings = sharding.state_shardings(abstract_params, mesh, rules)
    else:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(
          lambda v: v.replace(device), abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)
      )
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
    )
    # A run that trained a wrapper (a reward or value head) keeps the decoder under saved["decoder_path"].
    params = checkpointer.restore_params(step, target, prefix=saved.get("decoder_path", ""))
  finally:
    checkpointer.close()
  module = nnx.merge(graphdef, params, rest)
  _check_vocab(config, tokenizer, f"{path} step {step}")
  return module, tokenizer


def _check_vocab(config: model_lib.ModelConfig, tokenizer, where: str) -> None:
  if config.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f"the model's vocab_size={config.vocab_size} ({where}) is smaller than its tokenizer's "
        f"{tokenizer.vocab_size} ({tokenizer.path})"
    )
