"""Every notebook in examples/ runs top to bottom, so none can rot.

Each is executed by nbclient in a fresh python3 kernel with INGREDIENTS_NOTEBOOK_SMALL=1 (the notebooks'
tiny settings), in one working directory shared by the whole file: the notebooks after 01 start from
01's `runs/quickstart` when it is there (they train a tiny one themselves when run alone). The kernel
imports this checkout (PYTHONPATH), compiles with the suite's quick XLA flags on one device per core (as
the notebooks ask), and shares the session's persistent compilation cache. A cell that raises fails
the test (with the cell and its traceback); then a file each notebook writes at its end is checked.
About 6 minutes for the five on 2 CPU cores.
"""

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

from tests import xla_env

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
# A file each notebook writes at its end (relative to its working directory).
WRITES = {
    "01_pretrain.ipynb": "runs/quickstart/curves.png",
    "02_inference.ipynb": "runs/quickstart_hf/model.safetensors",
    "03_grpo_jsonl.ipynb": "runs/larger_grpo/curves.png",
    "04_lora_serve.ipynb": "runs/pirate_lora/adapter/adapter_model.safetensors",
    "05_scaling_laws.ipynb": "runs/scaling/chinchilla.png",
}
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("notebooks")


def test_every_notebook_is_checked():
  assert sorted(WRITES) == [path.name for path in NOTEBOOKS]


def test_notebooks_are_committed_without_outputs():
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, workdir):
  nb = nbformat.read(path, as_version=4)
  env = {
      **os.environ,
      "INGREDIENTS_NOTEBOOK_SMALL": "1",
      "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
      "XLA_FLAGS": xla_env.xla_flags(None),  # the suite's 8 fake devices are not the notebooks' business
      "JAX_PLATFORMS": "cpu",
  }
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, when a cell fails
  written = workdir / WRITES[path.name]
  assert written.is_file(), f"{path.name} ran but did not write {written}"
