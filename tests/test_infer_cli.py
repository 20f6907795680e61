"""Loading a run's workdir or a Hugging Face directory, and `python -m infer`'s streaming text path."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import infer
from configs import validation
from configs.infer import generate as generate_config
import rundir
from infer import cli
from model import quant, sharding
from tests import xla_env
from tests.test_train import _config  # the same tiny run the trainer tests use
from rundir import tokenizer as tokenizer_lib
from train import trainer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf"
STEPS = 3
PROMPT = "the cat sat"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run trained for a few steps; its workdir and the result (with the in-memory Run)."""
  corpus = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = "the cat sat on a mat while dogs ran far away from home and birds sang in trees".split()
  docs = [" ".join(rng.choice(words, size=rng.integers(5, 40))) + "." for _ in range(200)]
  (corpus / "part0.txt").write_text("\n\n".join(docs))
  workdir = tmp_path_factory.mktemp("run")
  config = _config(corpus, "", total_steps=STEPS, **{"mesh.data": 8})
  return workdir, trainer.train(config, workdir)


def _state(module):
  return nnx.state(module, nnx.Param)


def _params(module):
  return [np.asarray(x) for x in jax.tree.leaves(_state(module))]


def test_load_run_restores_the_trained_parameters_and_generates_the_same(trained):
  workdir, result = trained
  run = result["run"]
  module, tokenizer = rundir.load(workdir)  # no mesh: on one device
  assert module.config == run.model_config and tokenizer.vocab_size == run.tokenizer.vocab_size
  for restored, trained_param in zip(_params(module), _params(run.model()), strict=True):
    np.testing.assert_array_equal(restored, trained_param)
  assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(_state(module)))

  # On the run's own mesh, greedy generation is that of the in-memory model, token for token.
  module, _ = rundir.load(workdir, mesh=run.mesh, rules=run.rules, step=STEPS)
  prompt = cli.encode_prompt(tokenizer, PROMPT)
  expected = infer.generate(run.model(), [prompt], max_new_tokens=10, rules=run.rules)
  got = infer.generate(module, [prompt], max_new_tokens=10, rules=run.rules)
  assert got.tokens == expected.tokens and len(got.tokens[0]) >= 1

  # The quickstart's closing sample is this same greedy continuation, as text.
  completion = cli.complete(run.model(), run.tokenizer, PROMPT, max_new_tokens=10, rules=run.rules)
  assert completion.tokens == expected.tokens[0] and completion.prompt == PROMPT
  assert PROMPT + completion.text == tokenizer.decode(prompt + completion.tokens)


def test_a_run_trained_on_8_devices_loads_on_1(trained):
  workdir, result = trained
  checksum = sum(float(np.asarray(x, np.float64).sum()) for x in _params(result["run"].model()))
  script = (
      "import jax, numpy as np; import rundir; "
      f"m, _ = rundir.load({str(workdir)!r}); "
      "print(jax.device_count(), sum(float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(m)))"
  )
  env = xla_env.subprocess_env(None)  # one CPU device
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  devices, loaded = proc.stdout.split()[-2:]
  assert int(devices) == 1 and float(loaded) == pytest.approx(checksum, rel=1e-12)


def _cli_config(workdir, **overrides):
  """The CLI's config for 9 new tokens after PROMPT from `workdir`, on the run's mesh (its greedy
  tokens, exactly)."""
  config = generate_config.get_config()
  config.checkpoint = str(workdir)
  config.prompt = PROMPT
  config.max_new_tokens = 9
  config.mesh.data, config.mesh.tensor = 8, 1
  config.update(overrides)
  return config


def test_cli_streams_the_decoded_text_and_a_summary(trained):
  workdir, result = trained
  run = result["run"]
  config = _cli_config(workdir, stream_every=2)  # several chunks
  out = io.StringIO()
  completion = cli.run(config, out=out)

  prompt = cli.encode_prompt(run.tokenizer, PROMPT)
  expected = infer.generate(run.model(), [prompt], max_new_tokens=9, stop_tokens=[run.tokenizer.eos_id],
                            rules=run.rules)
  assert completion.tokens == expected.tokens[0]
  assert completion.finish_reason == expected.finish_reasons[0]
  np.testing.assert_allclose(completion.confidence, expected.confidence[0], atol=1e-4)
  text = run.tokenizer.decode(prompt + completion.tokens)  # decoded together: spaces are right
  reason = "stopped at eos" if completion.finish_reason == "stop" else "reached max_new_tokens"
  summary = f"[{len(completion.tokens)} tokens, {reason}, mean log-prob per token {completion.confidence:.3f}]"
  assert out.getvalue() == f"{text}\n{summary}\n"


def test_cli_quantized_int8_generates_as_the_quantized_run_and_says_so(trained):
  workdir, result = trained
  run = result["run"]
  config = _cli_config(workdir, quant="int8")
  out = io.StringIO()
  completion = cli.run(config, out=out)

  with sharding.axis_rules(run.mesh, run.rules):  # the codes and scales placed as the CLI places them
    quantized = quant.quantize(run.model(), "int8")
  prompt = cli.encode_prompt(run.tokenizer, PROMPT)
  expected = infer.generate(quantized, [prompt], max_new_tokens=9, stop_tokens=[run.tokenizer.eos_id],
                            rules=run.rules)
  assert completion.tokens == expected.tokens[0]
  np.testing.assert_allclose(completion.confidence, expected.confidence[0], atol=1e-4)
  # The tiny model's projections: 2 layers x (64*64 q + 2 * 64*32 k, v + 64*64 o + 3 * 64*128 gate,
  # up, down) = 73,728 weights, 294,912 bytes in float32; int8: a byte each plus a float32 scale per
  # output channel, 2 x (64 q + 2 * 32 k, v + 64 o + 2 * 128 gate, up + 64 down) x 4 = 4,096 bytes.
  assert cli.projection_bytes(quantized) == 73_728 + 4_096 == 77_824
  reason = "stopped at eos" if completion.finish_reason == "stop" else "reached max_new_tokens"
  summary = (f"[{len(completion.tokens)} tokens, {reason}, mean log-prob per token {completion.confidence:.3f}; "
             "weights int8-quantized: projections 76.0 KiB vs 288.0 KiB float32]")
  assert out.getvalue().splitlines()[-1] == summary


def test_load_errors_name_what_is_wrong(trained, tmp_path):
  workdir, _ = trained
  with pytest.raises(ValueError, match=r"step=7 has no checkpoint in .*saved steps: \[3\]"):
    rundir.load(workdir, step=7)
  with pytest.raises(FileNotFoundError, match=r"'.*nowhere' is neither a training run's workdir .* nor a Hugging Face"):
    rundir.load(tmp_path / "nowhere")
  (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
  shutil.copy(workdir / "tokenizer.model", tmp_path / "empty_run")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint yet"):
    rundir.load(tmp_path / "empty_run")


def test_load_hf_directory_needs_a_sentencepiece_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"llama has no tokenizer.model: only sentencepiece tokenizers"):
    rundir.load(FIXTURES / "llama")

  directory = tmp_path / "llama"
  shutil.copytree(FIXTURES / "llama", directory)
  # The fixture's vocabulary is 128: a small sentencepiece model without the 256 byte pieces fits.
  words = "the cat sat on a mat while dogs ran far away from home and birds sang in trees".split()
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, size=20)) for _ in range(100)]
  tokenizer_lib.train_tokenizer(texts, directory / "tokenizer.model", vocab_size=64, byte_fallback=False)
  with pytest.raises(ValueError, match="is a Hugging Face directory"):
    rundir.load(directory, step=1)

  module, tokenizer = rundir.load(directory)
  assert module.config.vocab_size == 128 and tokenizer.vocab_size == 64
  completion = cli.complete(module, tokenizer, PROMPT, max_new_tokens=5)
  expected = infer.generate(module, [cli.encode_prompt(tokenizer, PROMPT)], max_new_tokens=5,
                            stop_tokens=[tokenizer.eos_id])
  assert completion.tokens == expected.tokens[0]
  # The fixture's random weights pick ids past the tokenizer's 64; the text leaves them out.
  assert completion.text == cli.continuation(tokenizer, cli.encode_prompt(tokenizer, PROMPT), completion.tokens)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("checkpoint", "", "config.checkpoint is required"),
        ("max_new_tokens", 0, "config.max_new_tokens=0 must be >= 1"),
        ("stream_every", 0, "config.stream_every=0 must be >= 1"),
        ("step", -2, "config.step=-2 must be a checkpoint step"),
        ("temperature", -0.5, r"config.temperature=-0.5 must be >= 0"),
        ("top_k", -1, "config.top_k=-1 must be >= 0"),
        ("top_p", 0.0, r"config.top_p=0.0 must be in \(0, 1\]"),
        ("top_p", 1.5, r"config.top_p=1.5 must be in \(0, 1\]"),
        ("min_p", 2.0, r"config.min_p=2.0 must be in \[0, 1\]"),
        ("quant", "fp3", r"config.quant='fp3' is not a quantization scheme; use one of int8, int4, nf4 or '' \(off\)"),
        ("quant_block_size", 0, "config.quant_block_size=0 must be >= 1"),
    ],
)
def test_bad_config_values_name_the_key(key, value, message):
  config = generate_config.get_config()
  config.checkpoint = "runs/somewhere"
  config[key] = value
  with pytest.raises(validation.ConfigError, match=message):
    cli.validate(config)


def test_bad_config_keys_and_mesh_name_the_key():
  config = generate_config.get_config()
  config.checkpoint = "runs/somewhere"
  with config.unlocked():
    config.tempreature = 0.7
  with pytest.raises(validation.ConfigError, match="config.tempreature is not a known key"):
    cli.validate(config)
  config = generate_config.get_config()
  config.checkpoint = "runs/somewhere"
  config.mesh.data, config.mesh.tensor = 3, 1
  with pytest.raises(validation.ConfigError, match=r"config.mesh sizes .* multiply to 3, but there are 8 devices"):
    cli.run(config)  # before anything is loaded
  with pytest.raises(ValueError, match="config arg sampling='beam' is unknown"):
    generate_config.get_config("sampling=beam")
  assert cli.sampling_of(generate_config.get_config("sampling=nucleus")) == infer.Sampling(temperature=0.8, top_p=0.95)
