"""Two processes on 127.0.0.1 with 4 fake CPU devices each (gloo collectives) form one 8-device mesh
and train to the same losses as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_train import _config, _losses, corpus  # noqa: F401 (corpus is a fixture)
from train import trainer

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(corpus, tmp_path):  # noqa: F811
  root, tokenizer = corpus
  single = tmp_path / "single"
  config = _config(root, tokenizer, **{"mesh.data": -1})
  config.total_steps = 5
  trainer.train(config, single)

  multi, port = tmp_path / "multi", _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(ROOT)}
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.multihost_worker", str(root), str(tokenizer), str(multi), str(port), str(i), "2"],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=400)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  expected, got = _losses(single), _losses(multi)
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in range(1, 6)], [expected[s] for s in range(1, 6)], rtol=1e-5)
  saved = json.loads((multi / "config.json").read_text())
  assert saved["distributed"]["num_processes"] == 2
  assert (multi / "checkpoints" / "5").is_dir()
