"""python -m train --config=configs/pretrain/FILE.py[:ARG] --config.KEY=VALUE --workdir=DIR

Only parses flags; the work is in train.trainer, importable from a notebook.
"""

import logging

from train.host_devices import one_device_per_cpu_core

one_device_per_cpu_core()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import validation  # noqa: E402
from train import trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/...py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  config = _CONFIG.value
  prompt, sample_tokens = config.get("sample_prompt", ""), config.get("sample_tokens", 48)
  if prompt and sample_tokens < 1:  # found before training, not after it
    raise validation.ConfigError(f"config.sample_tokens={sample_tokens} must be >= 1")
  result = trainer.train(config, _WORKDIR.value)
  if prompt and not result.get("stopped_early"):
    print_sample(result["run"], prompt, sample_tokens)


def print_sample(run: trainer.Run, prompt: str, max_new_tokens: int) -> None:
  """Prints the final model's greedy continuation of `prompt`: a first look at what it learned.

  Every process generates (the parameters may span hosts); process 0 prints. infer is imported
  here, by the entry point: train's library code does not depend on infer (DESIGN.md).
  """
  from infer import cli  # noqa: PLC0415

  completion = cli.complete(run.model(), run.tokenizer, prompt, max_new_tokens=max_new_tokens, rules=run.rules)
  if jax.process_index() == 0:
    print(f"Sample: {completion.prompt}{completion.text}", flush=True)


if __name__ == "__main__":
  app.run(main)
