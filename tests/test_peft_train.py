"""PEFT through the one trainer (8 fake devices): only the adapters train and are checkpointed, the
base stays bitwise what init_from holds, a run resumes exactly, `rundir.load` rebuilds a PEFT run,
and SFT, DPO and GRPO run with LoRA and with QLoRA (three of the six through `python -m align`)."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import rundir
from align import run as align_run
from configs import common
from configs.align.common import align_config
from model import peft, quant
from tests import test_align_sft, xla_env
from train import trainer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320
TINY = dict(num_layers=2, vocab_size=VOCAB)  # embed 64, mlp 128: QLoRA's block of 64 divides both
tokenizer_path = test_align_sft.tokenizer_path  # the SFT tests' fixture: the same arithmetic tokenizer


def _config(method, tokenizer_path, init_from="", **overrides):
  config = align_config(method)
  config.total_steps, config.batch_size, config.seq_len = 3, 8, 96
  config.log_every, config.eval_every, config.checkpoint_every = 1, 0, 0
  config.init_from = str(init_from)
  config.model = common.model_config("tiny", **TINY)
  config.tokenizer.path = str(tokenizer_path)
  config.task.name, config.task.train_size, config.task.eval_size = "arithmetic", 64, 16
  config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 0
  config.mesh.data = 8
  config.update_from_flattened_dict(overrides)
  return config


LORA = {"peft.method": "lora", "peft.targets": "all", "peft.rank": 4, "peft.dropout": 0.1}
EXTENDED = {"model.rope_scaling": "linear", "model.rope_scaling_factor": 2.0}
QLORA = {"peft.method": "qlora", "peft.targets": "q_proj,v_proj,down_proj", "peft.rank": 4}


@pytest.fixture(scope="module")
def base_run(tokenizer_path, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("base")
  align_run.run(_config("sft", tokenizer_path, total_steps=2), workdir)
  return workdir


@pytest.fixture(scope="module")
def lora_run(tokenizer_path, base_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora")
  # A RoPE extension the base never had: loading the run must rebuild its base with it.
  config = _config("sft", tokenizer_path, base_run, **LORA, **EXTENDED)
  return align_run.run(config, workdir)["run"], workdir


def _names(state) -> set[str]:
  return {str(path[-1]) for path, _ in nnx.to_flat_state(state)}


def test_only_the_adapters_train(lora_run, base_run):
  run, _ = lora_run
  assert _names(run.state["params"]) == {"lora_a", "lora_b"}
  trained = peft.trainable_count(run.model())
  assert trained == sum(x.size for x in jax.tree.leaves(run.state["params"]))
  # AdamW's two moments of the adapters, nothing of the base's size.
  moments = [x for x in jax.tree.leaves(run.state["opt_state"]) if x.ndim]
  assert sum(x.size for x in moments) == 2 * trained
  assert all(np.any(np.asarray(b) != 0) for path, b in nnx.to_flat_state(run.state["params"]) if path[-1] == "lora_b")
  _assert_base_unchanged(run.policy(), base_run)


def _assert_base_unchanged(policy, base_run, *, trained=()):
  """The base inside the trained module is bitwise the init_from checkpoint's (but for `trained`)."""
  base, _ = rundir.load_decoder(base_run)
  for path, value in nnx.to_flat_state(nnx.state(base, nnx.Param)):
    here = policy
    for key in path:
      here = here[key] if isinstance(key, int) else getattr(here, key)
    if not isinstance(here, nnx.Variable):
      here = here.base  # an adapted projection keeps the parameter under `base`
    if peft.is_saved_module_param(path, trained):
      assert np.abs(np.asarray(here[...]) - np.asarray(value[...])).max() > 0, path
    else:
      np.testing.assert_array_equal(np.asarray(here[...]), np.asarray(value[...]), err_msg=str(path))


def _checkpointed_arrays(workdir: Path, step: int) -> list[str]:
  """The paths of the arrays in a checkpoint's train state, from orbax's metadata."""
  metadata = ocp.StandardCheckpointer().metadata(workdir / "checkpoints" / str(step) / "state")
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_the_checkpoint_holds_the_adapters_and_the_base_path(lora_run, base_run):
  _, workdir = lora_run
  reader = rundir.Checkpointer(workdir / "checkpoints", keep=10, async_save=False, read_only=True)
  try:
    saved = reader.restore_config(3)
  finally:
    reader.close()
  assert saved["init_from"] == str(base_run) and saved["peft"]["method"] == "lora"
  arrays = [p for p in _checkpointed_arrays(workdir, 3) if "['params']" in p or "['mu']" in p or "['nu']" in p]
  assert arrays and all("['lora_a']" in p or "['lora_b']" in p for p in arrays), arrays
  assert any("['embedding']" in p for p in _checkpointed_arrays(base_run, 2))  # a full run's has the base


def test_rundir_loads_a_peft_run_as_trained(lora_run, base_run):
  run, workdir = lora_run
  module, tokenizer = rundir.load(workdir)
  assert peft.has_adapters(module) and tokenizer.vocab_size == VOCAB
  assert (module.config.rope_scaling, module.config.rope_scaling_factor) == ("linear", 2.0)
  tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 9)))
  np.testing.assert_allclose(np.asarray(module(tokens)), np.asarray(run.policy()(tokens)), rtol=1e-6, atol=1e-6)
  base, _ = rundir.load_decoder(base_run)
  assert np.abs(np.asarray(module(tokens)) - np.asarray(base(tokens))).max() > 1e-3


def test_a_peft_run_resumes_exactly(lora_run, tokenizer_path, base_run, tmp_path):
  """Stopped after step 2 as a preemption would, then resumed to step 3: the adapters equal the
  uninterrupted run's bitwise (data order, dropout draws and the schedule included)."""
  run, _ = lora_run
  config = _config("sft", tokenizer_path, base_run, **LORA, **EXTENDED)
  first, _, _ = align_run.setup(config, tmp_path)
  trainer.train_loop(first, stop_at=2)
  resumed, _, _ = align_run.setup(config, tmp_path)
  assert int(resumed.state["step"]) == 2
  trainer.train_loop(resumed)
  for a, b in zip(jax.tree.leaves(resumed.state["params"]), jax.tree.leaves(run.state["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_longlora_trains_the_embedding_and_norms_beside_the_adapters(tokenizer_path, base_run, tmp_path):
  """config.peft.modules_to_save='embedding,norms' (LongLoRA): those base parameters train in full
  and are checkpointed with the adapters; the projections stay the base's bitwise; the run loads
  back as trained."""
  config = _config("sft", tokenizer_path, base_run, **LORA, **{"peft.modules_to_save": "embedding,norms"})
  run = align_run.run(config, tmp_path)["run"]
  assert _names(run.state["params"]) == {"lora_a", "lora_b", "embedding", "scale"}
  policy = run.policy()
  _assert_base_unchanged(policy, base_run, trained=("embedding", "norms"))
  module, _ = rundir.load(tmp_path)
  tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 9)))
  np.testing.assert_allclose(np.asarray(module(tokens)), np.asarray(policy(tokens)), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"modules_to_save='embeddings'"):
    peft.settings({"method": "lora", "modules_to_save": "embeddings"})


def test_dpo_with_lora_holds_one_copy_of_the_base(tokenizer_path, base_run, tmp_path):
  run = align_run.run(_config("dpo", tokenizer_path, base_run, **LORA, total_steps=2), tmp_path)["run"]
  everything = [x for x in jax.tree.leaves((run.state, run.rest))]
  embedding = (run.model_config.vocab_size, run.model_config.embed_dim)
  assert sum(x.shape == embedding for x in everything) == 1  # no reference copy, in the state or beside it
  assert not any("frozen" in str(path) for path, _ in nnx.to_flat_state(nnx.state(run.model())))
  assert (tmp_path / "reference_logps_train.npz").is_file()


def test_grpo_with_qlora_takes_its_reference_from_the_base(tokenizer_path, lora_run, tmp_path):
  """From the LoRA run (its adapters merged into the new base, which QLoRA then quantizes)."""
  config = _config("grpo", tokenizer_path, lora_run[1], **QLORA, total_steps=2, **{
      "grpo.kl_coef": 0.1, "rl.prompts_per_iteration": 2, "rl.samples_per_prompt": 4, "rl.max_new_tokens": 8})
  result = align_run.run(config, tmp_path)
  run = result["run"]
  assert run.decoder_path == "" and quant.is_quantized(run.model())
  assert np.isfinite(result["kl/reference"]) and result["kl/reference"] >= -1e-6
  assert _names(run.state["params"]) == {"lora_a", "lora_b"}


def _align_cli(tmp_path, config: str, workdir: Path, *flags: str) -> str:
  env = xla_env.subprocess_env(2)
  command = [sys.executable, "-m", "align", f"--config={config}", f"--workdir={workdir}", *flags]
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.mark.parametrize("method,config,peft_flags", [
    ("sft", "configs/align/sft.py:steps=2", ["--config.peft.method=qlora", "--config.peft.targets=all"]),
    ("dpo", "configs/align/dpo.py:steps=2", ["--config.peft.method=qlora"]),
    ("grpo", "configs/align/grpo.py:steps=2,prompts=2,group=2,batch=4",
     ["--config.peft.method=lora", "--config.grpo.kl_coef=0.05", "--config.rl.max_new_tokens=8"]),
])
def test_python_m_align_with_adapters(method, config, peft_flags, tokenizer_path, base_run, tmp_path):
  flags = [f"--config.init_from={base_run}", f"--config.tokenizer.path={tokenizer_path}",
           "--config.task.name=arithmetic", "--config.task.train_size=32", "--config.task.accuracy_problems=2",
           "--config.task.accuracy_tokens=8",
           "--config.seq_len=96", "--config.batch_size=4", "--config.eval_every=0", "--config.mesh.data=2",
           "--config.optimizer.warmup_steps=0", *peft_flags]
  out = _align_cli(tmp_path, config, tmp_path / method, *flags)
  assert "held-out problems of task 'arithmetic'" in out
  module, _ = rundir.load(tmp_path / method)
  assert peft.has_adapters(module)


def test_continued_pretraining_with_lora(tokenizer_path, base_run, tmp_path):
  """`python -m train`'s trainer with config.peft: next-token loss on the default corpus, adapters only."""
  config = common.train_config(total_steps=2, batch_size=8, seq_len=64, log_every=1, eval_every=2, eval_steps=1,
                               checkpoint_every=0, init_from=str(base_run))
  config.model = common.model_config("tiny", **TINY)
  config.tokenizer.path = str(tokenizer_path)
  config.mesh.data = 8
  config.optimizer.warmup_steps = 0
  config.update_from_flattened_dict({**LORA, "peft.method": "dora"})
  result = trainer.train(config, tmp_path)
  assert np.isfinite(result["eval_loss"])
  assert _names(result["run"].state["params"]) == {"lora_a", "lora_b", "lora_magnitude"}


def test_a_reward_model_trains_adapters_and_its_head_and_loads_back(tokenizer_path, base_run, tmp_path):
  """The head outside the decoder trains beside the adapters; reward_model.load rebuilds the
  wrapper from the base, the adapters and the head of the PEFT run's checkpoint."""
  from align import reward_model
  run = align_run.run(_config("reward", tokenizer_path, base_run, **LORA, total_steps=2), tmp_path)["run"]
  assert _names(run.state["params"]) == {"lora_a", "lora_b", "head"}
  loaded = reward_model.load(tmp_path, mesh=run.mesh, rules=run.rules)
  tokens = jax.numpy.asarray(np.random.default_rng(1).integers(0, VOCAB, (8, 12)))
  last = jax.numpy.full((8,), 11)
  np.testing.assert_allclose(np.asarray(loaded(tokens, last)), np.asarray(run.model()(tokens, last)), rtol=1e-5,
                             atol=1e-6)
  assert np.any(np.asarray(loaded.head[...]) != 0)
