"""Text in, text out: a prompt through the tokenizer, `infer.generate` / `infer.stream`, text back.

`run(config)` is the body of `python -m infer` (configs/infer/generate.py): load a run's workdir or
a Hugging Face directory, quantize its projection weights if `config.quant` asks (model/quant.py),
stream the continuation of `config.prompt` to `out`, and end with a summary line. `complete` is the
one-call form (the quickstart's closing sample uses it). A tokenizer here is anything with encode, decode, bos_id and eos_id (rundir.Tokenizer).
`main` is the command line of the entry points that read one config and write to stdout
(`python -m infer`, `python -m align.evaluate`).
"""

import dataclasses
import math
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import jax
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import infer
from infer.detokenize import continuation, decode
from configs import cli as configs_cli
from configs import validation
from configs.infer import generate as generate_config
import rundir
from model import projections, quant, sharding


@dataclasses.dataclass
class Completion:
  prompt: str  # the prompt as the tokenizer decodes it
  text: str  # what the generated tokens add to it
  tokens: list[int]  # the generated ids (a stop token included)
  finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
  confidence: float  # mean log-prob per generated token under the raw model; nan when none


def encode_prompt(tokenizer, prompt: str, *, add_bos: bool = True) -> list[int]:
  ids = list(tokenizer.encode(prompt))
  if add_bos and tokenizer.bos_id >= 0:  # a tokenizer may have no bos (sentencepiece says -1)
    ids = [tokenizer.bos_id, *ids]
  if not ids:
    raise ValueError("the prompt is empty and there is no bos token to start from; give a prompt")
  return ids


def stop_tokens(tokenizer, stop_at_eos: bool = True) -> tuple[int, ...]:
  return (tokenizer.eos_id,) if stop_at_eos and tokenizer.eos_id >= 0 else ()


def complete(
    model: nnx.Module,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    sampling: infer.Sampling = infer.Sampling(),
    rng=None,
    add_bos: bool = True,
    stop_at_eos: bool = True,
    rules=None,
) -> Completion:
  """The continuation of one text prompt (greedy by default), with `infer.generate`."""
  prompt_ids = encode_prompt(tokenizer, prompt, add_bos=add_bos)
  generation = infer.generate(
      model, [prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling, rng=rng,
      stop_tokens=stop_tokens(tokenizer, stop_at_eos), rules=rules,
  )
  tokens = generation.tokens[0]
  return Completion(
      prompt=decode(tokenizer, prompt_ids), text=continuation(tokenizer, prompt_ids, tokens), tokens=tokens,
      finish_reason=generation.finish_reasons[0], confidence=float(generation.confidence[0]),
  )


def stream_completion(
    model: nnx.Module,
    tokenizer,
    prompt: str,
    *,
    out: TextIO,
    max_new_tokens: int,
    chunk: int = 4,
    sampling: infer.Sampling = infer.Sampling(),
    rng=None,
    add_bos: bool = True,
    stop_at_eos: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
) -> Completion:
  """As `complete`, writing the prompt and then the continuation to `out` as it is generated."""
  prompt_ids = encode_prompt(tokenizer, prompt, add_bos=add_bos)
  stops = stop_tokens(tokenizer, stop_at_eos)
  head = decode(tokenizer, prompt_ids)
  out.write(head)
  out.flush()
  tokens: list[int] = []
  shown = ""
  chunks = infer.stream(
      model, [prompt_ids], max_new_tokens=max_new_tokens, chunk=chunk, sampling=sampling, rng=rng, stop_tokens=stops,
      mesh=mesh, rules=rules,
  )
  for new in chunks:
    tokens += new[0]
    # The whole continuation is decoded each time (byte pieces and spaces join across chunks);
    # a character whose UTF-8 bytes have not all arrived decodes as U+FFFD, so it waits.
    text = continuation(tokenizer, prompt_ids, tokens).rstrip("\ufffd")
    if len(text) > len(shown) and text.startswith(shown):
      out.write(text[len(shown):])
      out.flush()
      shown = text
  text = continuation(tokenizer, prompt_ids, tokens)
  out.write(text[len(shown):] if text.startswith(shown) else "")
  out.flush()
  generation = chunks.generation
  return Completion(
      prompt=head, text=text, tokens=tokens, finish_reason=generation.finish_reasons[0],
      confidence=float(generation.confidence[0]),
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Start-up checks of a generate config; each error names the key."""
  validation.check_keys(config.to_dict(), generate_config.get_config().to_dict())
  if not config.checkpoint:
    raise validation.ConfigError(
        "config.checkpoint is required: a training run's workdir or a Hugging Face directory "
        "(--config.checkpoint=DIR)"
    )
  for key in ("max_new_tokens", "stream_every"):
    if config[key] < 1:
      raise validation.ConfigError(f"config.{key}={config[key]} must be >= 1")
  checks = {
      "step": (config.step >= -1, "must be a checkpoint step, or -1 for the latest"),
      "temperature": (config.temperature >= 0, "must be >= 0 (0 is greedy)"),
      "top_k": (config.top_k >= 0, "must be >= 0 (0 is off)"),
      "top_p": (0 < config.top_p <= 1, "must be in (0, 1] (1 is off)"),
      "min_p": (0 <= config.min_p <= 1, "must be in [0, 1] (0 is off)"),
  }
  for key, (ok, requirement) in checks.items():
    if not ok:
      raise validation.ConfigError(f"config.{key}={config[key]!r} {requirement}")
  if config.quant not in ("", *quant.SCHEMES):
    raise validation.ConfigError(
        f"config.quant={config.quant!r} is not a quantization scheme; use one of {', '.join(quant.SCHEMES)} "
        "or '' (off)"
    )
  if config.quant_block_size < 1:
    raise validation.ConfigError(f"config.quant_block_size={config.quant_block_size} must be >= 1")
  if config.quant in ("int4", "nf4") and config.quant_block_size % 2:
    raise validation.ConfigError(f"config.quant_block_size={config.quant_block_size} must be even with "
                                 f"config.quant={config.quant!r} (two 4-bit codes per byte)")
  validation.check_sharding_rules(config.sharding_rules)


@dataclasses.dataclass(frozen=True)
class Quantization:
  """What `quantize` did: the scheme, and the bytes of the seven projection weights before and after."""

  scheme: str
  block_size: int | None  # None for int8 (one scale per output channel)
  float_bytes: int  # the projection weights as loaded
  float_dtype: str
  quantized_bytes: int  # their codes (4-bit ones two per byte) and scales

  def describe(self) -> str:
    block = f", blocks of {self.block_size}" if self.block_size else ""
    return (f"weights {self.scheme}-quantized{block}: projections {format_bytes(self.quantized_bytes)} "
            f"vs {format_bytes(self.float_bytes)} {self.float_dtype}")


def format_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB"):
    if n < 1024:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.2f} GiB"


def projection_bytes(module: nnx.Module) -> int:
  """Bytes of the decoder's seven projection weights: their parameters, or their codes and scales."""
  total = 0
  for slot in projections.slots(module):
    weight = slot.get()
    arrays = jax.tree.leaves(nnx.state(weight)) if isinstance(weight, nnx.Module) else [weight.get_value()]
    total += sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays)
  return total


def quantize(module: nnx.Module, config: ml_collections.ConfigDict) -> tuple[nnx.Module, Quantization]:
  """`model.quant.quantize(module, config.quant, block_size=config.quant_block_size)`; a block size
  that does not divide a weight's input features is a ConfigError naming config.quant_block_size.
  Call it inside the mesh's `sharding.axis_rules` so the codes and scales are placed like the weights."""
  block_size = config.quant_block_size
  float_dtype = str(next(projections.slots(module)).get().get_value().dtype)
  float_bytes = projection_bytes(module)
  try:
    module = quant.quantize(module, config.quant, block_size=block_size)
  except ValueError as e:  # a block size that does not divide a weight's input features
    raise validation.ConfigError(f"config.quant_block_size={block_size}: {e}") from e
  return module, Quantization(
      scheme=config.quant, block_size=None if config.quant == "int8" else block_size, float_bytes=float_bytes,
      float_dtype=float_dtype, quantized_bytes=projection_bytes(module),
  )


def sampling_of(config: ml_collections.ConfigDict) -> infer.Sampling:
  return infer.Sampling(
      temperature=config.temperature,
      top_k=config.top_k or None,
      top_p=config.top_p if config.top_p < 1 else None,
      min_p=config.min_p or None,
  )


def run(config: ml_collections.ConfigDict, out: TextIO = sys.stdout) -> Completion:
  """`python -m infer`: load config.checkpoint, stream the continuation of config.prompt to `out`."""
  # ------------------------------------------------------------------ check the config, set up the mesh
  validate(config)
  sampling = sampling_of(config)
  mesh = sharding.make_mesh(validation.check_mesh(config.mesh, jax.device_count()))
  rules = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.sharding_rules)

  # ------------------------------------------------------------------ load the model, sharded, and its tokenizer
  if not os.path.isdir(config.checkpoint):  # a typo, not a bug: say so in one line (configs/cli.py)
    raise validation.ConfigError(f"config.checkpoint={config.checkpoint!r} does not exist or is not a directory")
  step = None if config.step < 0 else config.step
  module, tokenizer = rundir.load(config.checkpoint, mesh=mesh, rules=rules, step=step)
  quantization = None
  if config.quant:  # weight-only: the float projection weights are dropped with `module`
    with sharding.axis_rules(mesh, sharding.with_default_rules(rules)):
      module, quantization = quantize(module, config)

  # ------------------------------------------------------------------ generate
  completion = stream_completion(
      module, tokenizer, config.prompt, out=out, max_new_tokens=config.max_new_tokens, chunk=config.stream_every,
      sampling=sampling, rng=config.seed, add_bos=config.add_bos, stop_at_eos=config.stop_at_eos, mesh=mesh,
      rules=rules,
  )
  reason = {"stop": "stopped at eos", "length": "reached max_new_tokens"}[completion.finish_reason]
  summary = f"{len(completion.tokens)} tokens, {reason}, mean log-prob per token {completion.confidence:.3f}"
  if quantization is not None:
    summary += f"; {quantization.describe()}"
  out.write(f"\n[{summary}]\n")
  out.flush()
  return completion


def main(work: Callable[[ml_collections.ConfigDict], Any], *, config_help: str, workdir_help: str) -> None:
  """Parses --config (required) and --workdir, then runs `work(config)` under configs.cli.run (a user's
  mistake is one line, exit status 2). --workdir is accepted so every entry point takes the same
  flags; these entry points write nothing but stdout."""
  config = config_flags.DEFINE_config_file("config", None, config_help)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config"])

  def parsed(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    work(config.value)

  configs_cli.run(parsed)
