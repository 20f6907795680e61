"""Long-context evaluation of any checkpoint: passkey retrieval and perplexity against length.

  python -m align.evaluate --config=configs/infer/passkey.py --config.checkpoint=runs/quickstart
  python -m align.evaluate --config=configs/infer/passkey.py --config.checkpoint=DIR \
      --config.lengths=128,256,512,1024 --config.model.rope_scaling=yarn --config.model.rope_scaling_factor=4

`model` holds ModelConfig fields to change when loading (a RoPE extension to try, or
shifted_sparse_group=0: a LongLoRA run scored with full attention, as the paper evaluates).
Held-out text: the run's own held-out documents (its config.data), or config.data's for a Hugging
Face directory or with perplexity_text='config'. Greedy answers; perplexity over `windows` windows per length.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  del arg
  config = ml_collections.ConfigDict()
  config.checkpoint = ""  # required: a run's workdir or a Hugging Face directory
  config.step = -1  # a run's checkpoint step; -1: the latest
  config.lengths = (128, 256, 512)  # prompt / window lengths in tokens
  config.depths = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key sits in the filler
  config.trials = 10  # keys per (length, depth)
  config.windows = 4  # perplexity windows per length
  config.batch_size = 8
  config.seed = 0
  # ModelConfig fields to change when loading (those not None).
  config.model = common.model_overrides(shifted_sparse_group=0)
  # Perplexity's held-out text: 'run', the run's own held-out documents (config.data for a Hugging
  # Face directory); 'config', config.data's (the embedded corpus unless changed), e.g. for a run
  # fine-tuned on passkey documents.
  config.perplexity_text = "run"
  config.data = common.data_config()
  return config
