"""python -m align.evaluate --config=configs/infer/passkey.py --config.checkpoint=DIR

Long-context evaluation of a checkpoint (align/passkey.py): passkey accuracy by prompt length and
depth, and perplexity by context length, printed as tables and returned by `run`.
"""

import os
import sys
from typing import TextIO

import ml_collections

import rundir
from align import passkey
from configs import validation
from infer import cli as infer_cli


def run(config: ml_collections.ConfigDict, out: TextIO = sys.stdout) -> dict:
  if not os.path.isdir(config.checkpoint):
    raise validation.ConfigError(f"config.checkpoint={config.checkpoint!r} does not exist or is not a directory")
  for key in ("lengths", "depths"):
    if not config[key]:
      raise validation.ConfigError(f"config.{key} is empty")
  if min(config.lengths) < 16:
    raise validation.ConfigError(f"config.lengths={tuple(config.lengths)}: each must be >= 16 tokens")
  overrides = validation.set_model_fields(config.model)
  model, tokenizer = rundir.load(config.checkpoint, step=None if config.step < 0 else config.step, **overrides)
  accuracy = passkey.passkey_accuracy(passkey.greedy_answers(model, tokenizer, batch_size=config.batch_size),
                                      tokenizer, config.lengths, config.depths, config.trials, seed=config.seed)
  if config.perplexity_text not in ("run", "config"):
    raise validation.ConfigError(f"config.perplexity_text={config.perplexity_text!r} is not 'run' or 'config'")
  data = (passkey.run_data_config(config.checkpoint) if config.perplexity_text == "run" else None) or config.data
  stream = passkey.held_out_stream(data, tokenizer, config.windows * (max(config.lengths) + 1))
  perplexity = passkey.perplexity_by_length(model, stream, config.lengths, windows=config.windows)
  out.write("passkey accuracy (rows: prompt tokens; columns: depth of the key)\n")
  out.write("length " + " ".join(f"{d:>6.2f}" for d in config.depths) + "   mean  perplexity\n")
  for length in config.lengths:
    row = accuracy[length]
    out.write(f"{length:>6} " + " ".join(f"{row[d]:>6.2f}" for d in config.depths)
              + f" {sum(row.values()) / len(row):>6.2f} {perplexity[length]:>11.2f}\n")
  return {"passkey": accuracy, "perplexity": perplexity}


if __name__ == "__main__":
  infer_cli.main(run, config_help="configs/infer/passkey.py[:arg]", workdir_help="Unused by evaluation.")
