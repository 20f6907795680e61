"""Generate text from a training run's workdir or a Hugging Face directory, streamed to the terminal.

  python -m infer --config=configs/infer/generate.py --config.checkpoint=DIR --config.prompt="..."

e.g. after the pre-training quickstart:

  python -m infer --config=configs/infer/generate.py --config.checkpoint=runs/quickstart \
    --config.prompt="Return the" --config.max_new_tokens=100

DIR is a run's workdir (its latest checkpoint and tokenizer.model) or a Hugging Face directory
with a sentencepiece tokenizer.model. Greedy by default; `:sampling=nucleus` (or
`--config.temperature=0.8 --config.top_p=0.95`) samples. Prints the text as it is produced and a
summary line: tokens generated, why generation stopped, and the mean log-prob per token.

`--config.quant=int8|int4|nf4` runs with weight-only quantized projection weights (model/quant.py:
int8 per output channel, int4 group-wise, NF4 blockwise, blocks of `quant_block_size` input
features); embeddings, the LM head and norms stay as loaded. The summary line then also says so,
with the bytes of the projection weights quantized and as they were loaded.
"""

import ml_collections

from configs import common

SAMPLING = {
    "greedy": dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
    "nucleus": dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.0),
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, sampling="greedy")
  if arg.sampling not in SAMPLING:
    raise ValueError(f"config arg sampling={arg.sampling!r} is unknown; known: {sorted(SAMPLING)}")
  config = ml_collections.ConfigDict()
  config.checkpoint = ""  # required: a run's workdir or a Hugging Face directory
  config.step = -1  # a run's checkpoint step; -1: the latest
  config.prompt = ""
  config.add_bos = True  # as the trainer's documents begin
  config.max_new_tokens = 64
  config.stop_at_eos = True
  config.temperature = 0.0  # 0: greedy
  config.top_k = 0  # 0: off
  config.top_p = 1.0  # 1.0: off
  config.min_p = 0.0  # 0.0: off
  config.update(SAMPLING[arg.sampling])
  config.seed = 0
  config.stream_every = 4  # decode steps between prints
  config.quant = ""  # '' (off), int8, int4 or nf4: weight-only quantization of the projections
  config.quant_block_size = 64  # int4 / nf4: input features per group / block (int8 is per channel)
  # Tensor parallelism over all devices (a dimension a mesh axis does not divide stays replicated).
  config.mesh = common.mesh_config(data=1, tensor=-1)
  config.sharding_rules = common.sharding_rules()
  return config
