"""One process of the two-process tests (tests/test_multihost.py); not a test module itself.

usage: python -m tests.multihost_worker MODES CORPUS_DIR TOKENIZER INIT_FROM WORKDIR PORT PROCESS_ID NUM_PROCESSES

MODES is a comma-separated list of train, ppo and grpo, run one after another in the same processes
(one jax.distributed start-up for all), each into WORKDIR/<mode>.
"""

import sys
from pathlib import Path

from tests import test_train  # the same small run the single-process tests train
from train import trainer


def pretrain_config(corpus_dir, tokenizer):
  config = test_train._config(Path(corpus_dir), tokenizer, **{"mesh.data": -1})
  config.total_steps = 5
  return config


def _online_config(method, tokenizer, init_from):
  """Two iterations of `method` on the arithmetic task from a pre-trained tiny run, its parameters
  sharded over all 8 devices (fsdp): sampling, scoring and learning on a mesh that spans processes."""
  from configs.align.common import align_config  # noqa: PLC0415

  c = align_config(method)
  c.init_from = str(init_from)
  c.tokenizer.path = str(tokenizer)
  c.seq_len = 64
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 0
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.task.name, c.task.difficulty, c.task.train_size = "arithmetic", 1, 16
  c.rl.max_new_tokens = 12
  c.rl.missing_eos_penalty = 1.0  # the tiny model rarely stops: scores (and advantages) differ by row
  c.optimizer.warmup_steps = 0
  c.optimizer.learning_rate = 1e-3
  return c


def ppo_config(tokenizer, init_from):
  """PPO: 8 prompts, 2 epochs of one minibatch each per iteration, with LoRA adapters on the
  fsdp-sharded base (the reference is the base with adapters off)."""
  c = _online_config("ppo", tokenizer, init_from)
  c.total_steps, c.batch_size = 4, 8
  c.rl.prompts_per_iteration, c.rl.epochs = 8, 2
  c.peft.method, c.peft.targets, c.peft.rank = "lora", "all", 4
  return c


def grpo_config(tokenizer, init_from):
  """GRPO: 4 prompts x a group of 4 per iteration, every parameter trained, with the KL term (its
  frozen reference a second copy, sharded like the policy) and 2 micro-batches whose loss
  normalizer is counted on the whole batch."""
  c = _online_config("grpo", tokenizer, init_from)
  c.total_steps, c.batch_size, c.grad_accum_steps = 2, 16, 2
  c.rl.prompts_per_iteration, c.rl.samples_per_prompt = 4, 4
  c.grpo.kl_coef, c.grpo.aggregation = 0.1, "token_mean"
  return c


def _run_mode(mode, corpus_dir, tokenizer, init_from, workdir, port, process_id, num_processes):
  if mode == "train":
    config = pretrain_config(corpus_dir, tokenizer)
  else:
    config = {"ppo": ppo_config, "grpo": grpo_config}[mode](tokenizer, init_from)
  config.distributed.coordinator_address = f"127.0.0.1:{port}"
  config.distributed.num_processes = int(num_processes)
  config.distributed.process_id = int(process_id)
  if mode == "train":
    trainer.train(config, workdir)
  else:
    from align import run as align_run  # noqa: PLC0415

    align_run.run(config, workdir)


def main(modes, corpus_dir, tokenizer, init_from, workdir, port, process_id, num_processes):
  for mode in modes.split(","):
    _run_mode(mode, corpus_dir, tokenizer, init_from, Path(workdir) / mode, port, process_id, num_processes)


if __name__ == "__main__":
  main(*sys.argv[1:])
