"""Two processes on 127.0.0.1 with 4 fake CPU devices each (gloo collectives) form one 8-device mesh
and train to the same losses as one process with 8 devices: pre-training, PPO with LoRA (adapters
on the frozen base, the reference its adapters-off view) and GRPO with full training and a frozen
reference copy, whose rollouts sample from parameters sharded across both processes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from align import run as align_run
from tests import multihost_worker, xla_env
from tests.test_train import _losses, corpus  # noqa: F401 (corpus is a fixture)
from train import trainer

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(modes, corpus_dir, tokenizer, init_from, workdir):
  """Runs `modes` (tests/multihost_worker.py) one after another in one pair of processes."""
  port = _free_port()
  env = xla_env.subprocess_env(4, PYTHONPATH=str(ROOT))
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.multihost_worker", modes, str(corpus_dir), str(tokenizer), str(init_from),
           str(workdir), str(port), str(i), "2"],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=900)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):  # noqa: F811
  """The 5-step pre-training run, in one process with 8 devices."""
  root, tokenizer = corpus
  single = tmp_path_factory.mktemp("single")
  trainer.train(multihost_worker.pretrain_config(root, tokenizer), single)
  return single


@pytest.fixture(scope="module")
def two_processes(corpus, pretrained, tmp_path_factory):  # noqa: F811
  """Pre-training, then PPO and GRPO from `pretrained`, in one pair of processes (one start-up for
  the three): {mode: its workdir}."""
  root, tokenizer = corpus
  multi = tmp_path_factory.mktemp("multi")
  modes = ("train", "ppo", "grpo")
  _run_two_processes(",".join(modes), root, tokenizer, pretrained, multi)
  return {mode: multi / mode for mode in modes}


def test_two_processes_train_like_one(pretrained, two_processes):
  multi = two_processes["train"]
  expected, got = _losses(pretrained), _losses(multi)
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in range(1, 6)], [expected[s] for s in range(1, 6)], rtol=1e-5)
  saved = json.loads((multi / "config.json").read_text())
  assert saved["distributed"]["num_processes"] == 2
  assert (multi / "checkpoints" / "5").is_dir()


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_two_processes_sample_and_learn_like_one(corpus, pretrained, two_processes, tmp_path, method):  # noqa: F811
  """PPO's two iterations with LoRA adapters, and GRPO's with every parameter trained, a frozen
  reference for its KL term and two micro-batches: the same samples (tokens, scores, log-probs,
  values, advantages) and the same losses whether the fsdp-sharded policy spans one process or two."""
  _, tokenizer = corpus
  single, multi = tmp_path / "single", two_processes[method]
  config_of = {"ppo": multihost_worker.ppo_config, "grpo": multihost_worker.grpo_config}[method]
  align_run.run(config_of(tokenizer, pretrained), single)
  expected, got = _losses(single), _losses(multi)
  steps = list(range(1, config_of(tokenizer, pretrained).total_steps + 1))
  assert sorted(got) == sorted(expected) == steps
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=1e-4,
                             atol=1e-4)  # the losses are ~1e-2: cross-process sums add in another order
  for iteration in (0, 1):
    with np.load(single / "rollouts" / f"{iteration}.npz") as a, np.load(multi / "rollouts" / f"{iteration}.npz") as b:
      assert sorted(a.files) == sorted(b.files)
      np.testing.assert_array_equal(a["row/tokens"], b["row/tokens"])
      for key in a.files:
        if a[key].dtype.kind == "f":
          np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
