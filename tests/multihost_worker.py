"""One process of the two-process test (tests/test_multihost.py); not a test module itself.

usage: python -m tests.multihost_worker CORPUS_DIR TOKENIZER WORKDIR PORT PROCESS_ID NUM_PROCESSES
"""

import sys

from tests import test_train  # the same small run the single-process tests train
from train import trainer


def main(corpus_dir, tokenizer, workdir, port, process_id, num_processes):
  config = test_train._config(__import__("pathlib").Path(corpus_dir), tokenizer, **{"mesh.data": -1})
  config.total_steps = 5
  config.distributed.coordinator_address = f"127.0.0.1:{port}"
  config.distributed.num_processes = int(num_processes)
  config.distributed.process_id = int(process_id)
  trainer.train(config, workdir)


if __name__ == "__main__":
  main(*sys.argv[1:])
