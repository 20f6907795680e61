"""Pre-train a small Llama-style model on the embedded corpus (the standard library's docstrings).

  python -m train --config=configs/pretrain/quickstart.py --workdir=runs/quickstart

Runs on a 2-core laptop CPU in under 10 minutes; the loss falls from ~8.3 (uniform over the
vocabulary) and the run ends by printing held-out perplexity, where the checkpoint is, and a
short sample from the model (`--config.sample_prompt=''` turns it off; `--config.sample_temperature=0`
makes it greedy). Generate more with
`python -m infer --config=configs/infer/generate.py --config.checkpoint=runs/quickstart --config.prompt="..."`.
Variants: `:steps=50` for a smoke test; `:size=small` for a half-width, 2-layer model (0.9 M parameters) (the
student of configs/align/distill_arithmetic.py); on your own text, add
`--config.data.source=text --config.data.paths='my/corpus/*.txt'`.
"""

from configs import common

SIZES = {
    "base": dict(embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768),
    "small": dict(embed_dim=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, mlp_dim=384),
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, steps=450, size="base")
  if arg.size not in SIZES:
    raise ValueError(f"config arg size={arg.size!r} is not one of {sorted(SIZES)}")
  config = common.train_config()
  config.total_steps = arg.steps
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 25
  config.eval_every = max(arg.steps // 3, 1)
  config.eval_steps = 8
  config.checkpoint_every = 200
  config.sample_prompt = "Return the"  # the corpus is the standard library's docstrings
  # Greedy, a model this small loops ("Return the be be be ..."); sampled, it reads more like its corpus.
  config.sample_temperature = 0.7
  config.sample_top_p = 0.9
  config.model = common.model_config(
      "tiny", **SIZES[arg.size], tie_embeddings=True,
      dtype="float32",  # CPUs have no bf16 matrix units: XLA would emulate bf16 there, slower
  )
  config.tokenizer.vocab_size = 4096
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = min(50, arg.steps // 10)
  config.optimizer.weight_decay = 0.05
  return config
