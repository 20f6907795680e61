"""GRPO on Llama 3.1 8B on a v5p-64 slice, with LoRA adapters (`:peft=none` for full weights):

  python -m train.aot --config=configs/align/grpo_llama3_8b.py --job=grpo   # compile train step and rollout here
  python -m align --config=configs/align/grpo_llama3_8b.py --config.init_from=HF_DIR \\
      --config.task.name=jsonl --config.task.path=gsm8k.jsonl --workdir=gs://...   # on the slice

Each iteration samples 8 completions of up to 512 tokens for each of 64 prompts on the live policy
(the rollout), then takes one on-policy step over those 512 rows in 4 micro-batches, fully sharded
over the slice's 32 chips, with full remat and flash attention. LoRA (rank 16 on every projection)
keeps the base frozen: it is the KL reference too, so no second copy is held. init_from must be a
Hugging Face directory of Llama 3.1 8B whose tokenizer is a sentencepiece model (configs/align/grpo.py
explains the rest; the arithmetic task is the default, any JSONL or Python task works).
"""

from configs import common
from configs.align import grpo

SLICES = {"v5p-64": dict(chips=32)}
DEFAULTS = dict(topology="v5p-64", peft="lora", init="checkpoints/llama-3.1-8b", steps=200, lr=1e-5, kl=0.0)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, **DEFAULTS)
  if arg.topology not in SLICES:
    raise ValueError(f"config arg topology={arg.topology!r} is not one this config is sized for: {sorted(SLICES)}")
  config = grpo.build(common.parse_arg(f"steps={arg.steps},lr={arg.lr},kl={arg.kl}", **grpo.DEFAULTS))
  config.topology = arg.topology
  config.init_from = arg.init
  config.task.name = "arithmetic"
  config.seq_len = 1024  # prompt and completion
  config.rl.max_new_tokens = 512
  config.rl.prompts_per_iteration = 64
  config.rl.samples_per_prompt = 8
  config.batch_size = 512
  config.grad_accum_steps = 4
  config.mesh = common.mesh_config(data=1, fsdp=-1)
  config.model = common.model_config("llama3.1-8b", dtype="bfloat16", param_dtype="float32", remat_policy="full",
                                     attention_impl="pallas")
  if arg.peft != "none":
    config.peft = common.peft_config(method=arg.peft, rank=16, alpha=32.0, targets="all")
  return config
