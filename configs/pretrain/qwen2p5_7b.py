"""Qwen 2.5 7B pre-training on a TPU slice: v5p-64 by default, `:topology=v6e-64` too.

  python -m train.aot --config=configs/pretrain/qwen2p5_7b.py               # compile and report here
  python -m train --config=configs/pretrain/qwen2p5_7b.py --workdir=gs://...  # on the slice

Fully sharded over every chip, full remat, flash attention, bf16 compute with fp32 weights and Adam
moments, 8192-token sequences (configs/at_scale.py).
"""

from configs import common
from configs.at_scale import scaled_config

SLICES = {
    "v5p-64": dict(chips=32, per_chip=4, mesh=dict(data=1, fsdp=-1)),
    "v6e-64": dict(chips=64, per_chip=2, mesh=dict(data=1, fsdp=-1)),
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, topology="v5p-64", steps=20_000)
  return scaled_config("qwen2.5-7b", topology=arg.topology, slices=SLICES, seq_len=8192, steps=arg.steps,
                       learning_rate=3e-4)
