"""Gemma 2 9B pre-training on a TPU slice: v5p-64 by default, `:topology=v6e-64` too.

  python -m train.aot --config=configs/pretrain/gemma2_9b.py               # compile and report here
  python -m train --config=configs/pretrain/gemma2_9b.py --workdir=gs://...  # on the slice

Fully sharded over every chip, full remat, flash attention (with Gemma 2's logit soft-cap), bf16
compute with fp32 weights and Adam moments (configs/at_scale.py). Sequences of 4096 tokens:
no longer than Gemma 2's 4096-token window, every layer attends globally, so the scanned layers
keep a static window and the flash kernel (at 8192 the alternating local/global windows are scanned
over as data, which only plain attention takes; `--config.model.scan_layers=False` keeps them
static at a longer compile).
"""

from configs import common
from configs.at_scale import scaled_config

SLICES = {
    "v5p-64": dict(chips=32, per_chip=8, mesh=dict(data=1, fsdp=-1)),
    "v6e-64": dict(chips=64, per_chip=4, mesh=dict(data=1, fsdp=-1)),
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, topology="v5p-64", steps=20_000)
  return scaled_config("gemma2-9b", topology=arg.topology, slices=SLICES, seq_len=4096, steps=arg.steps,
                       learning_rate=3e-4)
