"""The default scaling sweep: IsoFLOP profiles of small Llama-style models on the embedded corpus.

  python -m train.sweep --config=configs/scaling/default.py --workdir=runs/scaling
  python -m train.scaling --workdir=runs/scaling --out=runs/scaling/fits

Sizes are d<embed_dim>l<num_layers> (heads of head_dim, an MLP mlp_ratio x the width); each size is
trained at each budget (FLOPs) for the tokens the budget buys, skipping step counts outside
[min_steps, max_steps]; then one run at `extrapolate` x the largest budget at the size the grid's
fit calls compute-optimal, its loss predicted first. The sizes bracket each budget's optimum on
the embedded corpus; on a quiet 2-core CPU the grid takes about 40 minutes and the extrapolation run
about 35 more (measured times and the fits are in README's "Scaling laws" section). Arguments: `:quick=True` for a
3-point smoke test of a few minutes.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, quick=False)
  config = ml_collections.ConfigDict()
  config.base = common.train_config()  # every point's training config, before its size and steps
  config.base.batch_size = 16
  config.base.seq_len = 128
  config.base.eval_steps = 16  # the same 16 held-out batches score every point
  config.base.model = common.model_config("tiny", dtype="float32", tie_embeddings=True)
  config.base.tokenizer.vocab_size = 2048  # small, so the models' compute is mostly their non-embedding part
  config.base.optimizer.learning_rate = 3e-3
  config.base.optimizer.weight_decay = 0.05
  config.sizes = "d16l1,d32l1,d32l2,d48l2,d64l2"  # brackets each budget's optimum (README: Scaling laws)
  config.head_dim = 16
  config.kv_heads_ratio = 1  # query heads per kv head
  config.mlp_ratio = 3.0
  config.budgets = "1e12,2e12,4e12"  # FLOPs, as flop_count counts them
  config.counting = "non_embedding"  # N for the fits: 'non_embedding' (Kaplan) or 'total' (Chinchilla)
  config.flop_count = "model"  # C: 'model' (model.flops_per_token: every matmul and attention) or '6nd'
  config.min_steps = 40
  config.max_steps = 10_000
  config.warmup_fraction = 0.1
  config.log_points = 25  # training-loss records per run (Approach 1's curves)
  config.extrapolate = 8.0  # then one run at 8x the largest budget (0: none)
  config.extrapolation_sizes = "d32l2,d48l2,d64l2,d96l2,d128l3"
  config.parallel = 1
  if arg.quick:
    config.sizes, config.budgets, config.extrapolate = "d32l1,d64l1,d96l1", "5e10", 0.0
    config.min_steps = 5
  return config
