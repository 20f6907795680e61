"""What the at-scale pre-training configs share: a preset on a Cloud TPU slice, sized to fit.

Each config (llama3_8b.py, ...) names its slices and, per slice, the mesh and the sequences per
chip that fit it; `python -m train.aot --config=configs/pretrain/FILE.py` compiles it for its
default slice on any machine with libtpu (`pip install -e '.[tpu]'`) and reports HBM, flops and
XLA's estimated step time. Data: the embedded corpus by default (a smoke test); a real run gives
`--config.data.source=text --config.data.paths=...` (or ArrayRecord) and, fine-tuning a released
model, `--config.init_from=HF_DIR` (its tokenizer must be a sentencepiece model).
"""

import ml_collections

from configs import common


def scaled_config(preset: str, *, topology: str, slices: dict[str, dict], seq_len: int, steps: int,
                  learning_rate: float, model_overrides: dict | None = None) -> ml_collections.ConfigDict:
  """A train config of `preset` on `topology` (one of `slices`: {name: {chips, per_chip, mesh}})."""
  if topology not in slices:
    raise ValueError(f"config arg topology={topology!r} is not one this config is sized for: {sorted(slices)}")
  size = slices[topology]
  config = common.train_config()
  config.topology = topology
  config.total_steps = steps
  config.seq_len = seq_len
  config.batch_size = size["per_chip"] * size["chips"]
  config.grad_accum_steps = size.get("grad_accum", 1)
  config.mesh = common.mesh_config(**size["mesh"])
  config.model = common.model_config(
      preset, dtype="bfloat16", param_dtype="float32", remat_policy=size.get("remat", "full"),
      attention_impl="pallas", **(model_overrides or {}),
  )
  config.optimizer.learning_rate = learning_rate
  config.optimizer.warmup_steps = min(2000, steps // 10)
  config.log_every = 10
  config.eval_every = 1000
  config.checkpoint_every = 1000
  return config
