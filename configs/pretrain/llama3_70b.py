"""Llama 3.1 70B pre-training on a v5p-512 slice (256 chips).

  python -m train.aot --config=configs/pretrain/llama3_70b.py               # compile and report here
  python -m train --config=configs/pretrain/llama3_70b.py --workdir=gs://...  # on the slice

Fully sharded over every chip, full remat, flash attention, bf16 compute with fp32 weights and Adam
moments, 8192-token sequences, two per chip: about 4M tokens a step (configs/at_scale.py).
"""

from configs import common
from configs.at_scale import scaled_config

SLICES = {
    "v5p-512": dict(chips=256, per_chip=2, mesh=dict(data=1, fsdp=-1)),
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, topology="v5p-512", steps=20_000)
  return scaled_config("llama3.1-70b", topology=arg.topology, slices=SLICES, seq_len=8192, steps=arg.steps,
                       learning_rate=1.5e-4)
