"""The body of `python -m infer.serve` (configs/infer/serve.py): check the config, load the checkpoint,
pick the chat template, serve the app with uvicorn.

  server.run(config, chat_templates={"chatml": render, ...})  # render: messages -> prompt text

The named chat templates come from the caller: they are align.chat's, which infer may not import (the
entry point passes them in). A bad key or value is a ConfigError naming it, before anything loads.
"""

import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import ml_collections
import uvicorn

import infer
import rundir
from configs import validation
from configs.infer import serve as serve_config
from infer.serve.app import build_app
from infer.serve.async_engine import AsyncEngine
from infer.serve.chat_template import TOKENIZER_CONFIG, hf_chat_template, jinja_renderer

ChatTemplate = Callable[[list[dict]], str]
DEFAULT_TEMPLATE = "chatml"  # when the checkpoint has no chat_template of its own
_POSITIVE = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting")
_AUTO = ("num_blocks", "max_model_len")  # 0: chosen by the engine


def validate(config: ml_collections.ConfigDict, chat_templates: Collection[str]) -> None:
  """Start-up checks of a serve config; each error names the key."""
  validation.check_keys(config.to_dict(), serve_config.get_config().to_dict())
  if not config.checkpoint:
    raise validation.ConfigError(
        "config.checkpoint is required: a training run's workdir or a Hugging Face directory "
        "(--config.checkpoint=DIR)")
  checks = {key: (config[key] >= 1, "must be >= 1") for key in _POSITIVE}
  checks |= {key: (config[key] >= 0, "must be >= 0 (0 is auto)") for key in _AUTO}
  checks["step"] = (config.step >= -1, "must be a checkpoint step, or -1 for the latest")
  checks["port"] = (0 <= config.port < 65536, "must be a TCP port in [0, 65535]")
  for key, (ok, requirement) in checks.items():
    if not ok:
      raise validation.ConfigError(f"config.{key}={config[key]!r} {requirement}")
  if config.chat_template and config.chat_template not in chat_templates:
    raise validation.ConfigError(
        f"config.chat_template={config.chat_template!r} is not one of {sorted(chat_templates)}; or '' for the "
        f"checkpoint's own {TOKENIZER_CONFIG} chat_template (else {DEFAULT_TEMPLATE})")


def adapter_paths(config: ml_collections.ConfigDict) -> dict[str, str]:
  """config.adapters, "name=DIR,name2=DIR2", as {name: DIR}; a malformed entry is a ConfigError."""
  paths = {}
  for entry in filter(None, (e.strip() for e in config.adapters.split(","))):
    name, _, path = entry.partition("=")
    if not name or not path or name in paths or name == model_name(config):
      raise validation.ConfigError(
          f"config.adapters entry {entry!r} must be NAME=DIR with a name not used before (nor the model's)")
    if not os.path.isdir(path):
      raise validation.ConfigError(f"config.adapters: {path!r} (adapter {name!r}) is not a directory")
    paths[name] = path
  return paths


def engine_config(config: ml_collections.ConfigDict) -> infer.EngineConfig:
  return infer.EngineConfig(
      block_size=config.block_size, num_blocks=config.num_blocks or None, max_num_seqs=config.max_num_seqs,
      max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len or None,
      enable_prefix_caching=config.enable_prefix_caching, max_waiting=config.max_waiting, seed=config.seed)


def model_name(config: ml_collections.ConfigDict) -> str:
  return config.model_name or Path(config.checkpoint).resolve().name


def pick_chat_template(config: ml_collections.ConfigDict,
                       chat_templates: Mapping[str, ChatTemplate]) -> tuple[str, ChatTemplate]:
  """(what it is, messages -> prompt text): the named one, else the checkpoint's own, else chatml."""
  if config.chat_template:
    return config.chat_template, chat_templates[config.chat_template]
  try:
    template = hf_chat_template(config.checkpoint)
    if template is not None:
      return f"the chat_template of {TOKENIZER_CONFIG}", jinja_renderer(template)
  except ValueError as e:  # the file or its template does not parse
    raise validation.ConfigError(f"config.checkpoint={config.checkpoint!r}: {e}") from None
  return DEFAULT_TEMPLATE, chat_templates[DEFAULT_TEMPLATE]


def run(config: ml_collections.ConfigDict, *, chat_templates: Mapping[str, ChatTemplate]) -> None:
  """Serves config.checkpoint on config.host:config.port until interrupted."""
  # ------------------------------------------------------------------ check the config
  validate(config, chat_templates)
  if not os.path.isdir(config.checkpoint):  # a typo, not a bug: one line (configs/cli.py)
    raise validation.ConfigError(f"config.checkpoint={config.checkpoint!r} does not exist or is not a directory")
  template_name, chat_template = pick_chat_template(config, chat_templates)
  adapters = adapter_paths(config)

  # ------------------------------------------------------------------ load the model (on one device) and the engine
  module, tokenizer = rundir.load(config.checkpoint, step=None if config.step < 0 else config.step)
  try:
    engine = infer.Engine(module, tokenizer, engine_config(config), adapters=adapters)
  except ValueError as e:  # "EngineConfig.num_blocks=... cannot hold one sequence", an adapter that is not LoRA
    raise validation.ConfigError(str(e).replace("EngineConfig.", "config.")) from None

  if config.warmup:
    started = time.perf_counter()
    shapes = engine.warmup()
    print(f"compiled {shapes} step shapes in {time.perf_counter() - started:.0f} s", flush=True)

  # ------------------------------------------------------------------ serve
  name = model_name(config)
  app = build_app(AsyncEngine(engine), model_name=name, chat_template=chat_template)
  print(f"serving {name!r} ({config.checkpoint}, max_model_len={engine.max_model_len}, chat template: "
        f"{template_name}{', adapters: ' + ', '.join(adapters) if adapters else ''}) on "
        f"http://{config.host}:{config.port}/v1", flush=True)
  # Streams still open at shutdown get a few seconds, then their requests are aborted.
  uvicorn.run(app, host=config.host, port=config.port, timeout_graceful_shutdown=5)
