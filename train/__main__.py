"""python -m train --config=configs/pretrain/FILE.py[:ARG] --config.KEY=VALUE --workdir=DIR

Only parses flags; the work is in train.trainer, importable from a notebook. A bad config, key or
path is reported in one line with exit status 2; --verbosity=1 shows its traceback (configs/cli.py).
"""

import dataclasses
import logging

from train.host_devices import one_device_per_cpu_core

one_device_per_cpu_core()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import infer  # noqa: E402
from configs import cli, validation  # noqa: E402
from infer import cli as infer_cli  # noqa: E402
from train import trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/...py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.")
flags.mark_flags_as_required(["config", "workdir"])


@dataclasses.dataclass(frozen=True)
class Sample:
  """The closing sample of a run: config.sample_*."""

  prompt: str
  max_new_tokens: int
  sampling: infer.Sampling
  seed: int


def sample_of(config) -> Sample | None:
  """config.sample_*, checked (before training, not after it); None when config.sample_prompt is ''."""
  if not config.get("sample_prompt", ""):
    return None
  if config.sample_tokens < 1:
    raise validation.ConfigError(f"config.sample_tokens={config.sample_tokens} must be >= 1")
  try:
    sampling = infer.Sampling(
        temperature=config.sample_temperature, top_p=config.sample_top_p if config.sample_top_p != 1 else None
    )
  except ValueError as e:  # Sampling checks its own fields; name them as the config does
    raise validation.ConfigError(str(e).replace("Sampling.", "config.sample_")) from None
  return Sample(config.sample_prompt, config.sample_tokens, sampling, config.sample_seed)


def print_sample(model: nnx.Module, tokenizer, sample: Sample, rules=None) -> None:
  """Prints the model's continuation of sample.prompt: a first look at what it learned.

  Every process generates (the parameters may span hosts), with the same seed; process 0 prints.
  """
  completion = infer_cli.complete(
      model, tokenizer, sample.prompt, max_new_tokens=sample.max_new_tokens, sampling=sample.sampling,
      rng=sample.seed, rules=rules,
  )
  if jax.process_index() == 0:
    print(f"Sample: {completion.prompt}{completion.text}", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  config = _CONFIG.value
  sample = sample_of(config)
  result = trainer.train(config, _WORKDIR.value)
  if sample and not result.get("stopped_early"):
    run = result["run"]
    print_sample(run.model(), run.tokenizer, sample, rules=run.rules)


if __name__ == "__main__":
  cli.run(main)
