"""`python -m train|align|infer` at start-up: a user's mistake is one line and exit status 2 (configs/cli.py),
and the closing sample of `python -m train` is drawn with config.sample_*.

The subprocess tests each start a Python that imports jax (seconds); every error is found before
anything is trained or compiled.
"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import infer
from configs import cli, common, validation
from tests.scripted_model import ScriptedModel

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = "--config=configs/pretrain/quickstart.py:steps=2"


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


def _one_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == cli.EXIT_STATUS, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_a_misspelled_key_is_one_line_with_the_closest_key_and_verbosity_keeps_the_traceback(tmp_path):
  args = (QUICKSTART, f"--workdir={tmp_path / 'run'}", "--config.optimzer.learning_rate=1e-3")
  line = _one_line(_run("train", *args))
  assert line == "error: unknown config key 'optimzer.learning_rate'; did you mean 'optimizer.learning_rate'?"

  proc = _run("train", *args, "--verbosity=1")
  assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
  assert not (tmp_path / "run").exists()


def test_a_value_the_start_up_checks_refuse_is_one_line_before_anything_runs(tmp_path):
  line = _one_line(_run("train", QUICKSTART, f"--workdir={tmp_path / 'run'}", "--config.batch_size=0"))
  assert line == "error: config.batch_size=0 must be >= 1"
  assert not (tmp_path / "run").exists()  # the trainer checks the config before it makes the workdir


@pytest.mark.parametrize(
    "module, args, message",
    [
        ("align", ("--config=configs/align/no_such_method.py", "--workdir=unused"),
         "error: cannot load the config file: [Errno 2] No such file or directory: 'configs/align/no_such_method.py'"),
        ("infer", ("--config=configs/infer/generate.py", "--config.max_new_tokens=many"),
         "error: flag --config.max_new_tokens=many: invalid literal for int() with base 10: 'many'"),
    ],
)
def test_a_missing_config_file_or_a_bad_value_type_is_one_line(module, args, message):
  assert _one_line(_run(module, *args)) == message


@pytest.mark.parametrize("module,config", [("infer", "configs/infer/generate.py"),
                                           ("align.evaluate", "configs/infer/passkey.py")])
def test_a_missing_checkpoint_is_named_in_the_last_line(tmp_path, module, config):
  proc = _run(module, f"--config={config}", f"--config.checkpoint={tmp_path / 'nowhere'}")
  assert proc.returncode == cli.EXIT_STATUS and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # jax may log its backend start-up above it
  assert proc.stderr.splitlines()[-1] == (
      f"error: config.checkpoint={str(tmp_path / 'nowhere')!r} does not exist or is not a directory"
  )


def test_passkey_evaluation_takes_any_model_field_to_change(tmp_path):
  """--config.model.<any ModelConfig field> parses (a RoPE extension to try on a checkpoint): the
  run gets as far as the missing checkpoint."""
  proc = _run("align.evaluate", "--config=configs/infer/passkey.py", f"--config.checkpoint={tmp_path / 'nowhere'}",
              "--config.model.rope_scaling=yarn", "--config.model.rope_scaling_factor=8")
  assert proc.stderr.splitlines()[-1].startswith("error: config.checkpoint="), proc.stderr[-3000:]


def test_unknown_key_messages_name_the_closest_key_or_the_keys_there_are():
  config = common.train_config()
  assert cli.unknown_key_message(config, "optimizer.lr") == (
      "unknown config key 'optimizer.lr'; did you mean 'optimizer.learning_rate'?"  # by its initials
  )
  assert cli.unknown_key_message(config, "warmup_steps") == (
      "unknown config key 'warmup_steps'; did you mean 'optimizer.warmup_steps'?"  # a key at the wrong level
  )
  message = cli.unknown_key_message(config, "mesh.zzz")
  assert message == f"unknown config key 'mesh.zzz'; the keys of config.mesh are {', '.join(sorted(config.mesh))}"


# ---------------------------------------------------------------------------------------------- the closing sample
A, B = ord("a"), ord("b")
# After 'a' or 'b': 'a' with probability 0.6, 'b' with 0.4. Greedy writes only 'a'; sampling also 'b'.
MODEL = ScriptedModel({1: A, A: {A: 0.6, B: 0.4}, B: {A: 0.6, B: 0.4}}, vocab_size=128)


class _Chars:
  """One token per ASCII character (id = its code); 1 and 2 are bos and eos."""

  bos_id, eos_id, vocab_size = 1, 2, 128

  def encode(self, text):
    return [ord(ch) for ch in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i > 2)


def _printed_sample(capsys, **sample_keys) -> str:
  # The entry point's module: importing it defines its absl flags, and parses nothing.
  train_main = importlib.import_module("train.__main__")
  config = common.train_config(sample_prompt="a", sample_tokens=16, **sample_keys)
  train_main.print_sample(MODEL, _Chars(), train_main.sample_of(config))
  return capsys.readouterr().out.removeprefix("Sample: ").removesuffix("\n")


def _generated(sampling: infer.Sampling, seed: int) -> str:
  out = infer.generate(MODEL, [[1, A]], max_new_tokens=16, sampling=sampling, rng=seed, stop_tokens=[2])
  return "a" + _Chars().decode(out.tokens[0])


def test_the_closing_sample_is_drawn_with_the_configured_temperature_top_p_and_seed(capsys):
  greedy = _printed_sample(capsys, sample_temperature=0.0, sample_top_p=0.95, sample_seed=3)
  assert greedy == _generated(infer.Sampling(), 0) == "a" * 17

  sampled = {seed: _printed_sample(capsys, sample_temperature=1.0, sample_seed=seed) for seed in (0, 1)}
  for seed, text in sampled.items():
    assert text == _generated(infer.Sampling(temperature=1.0), seed)
  assert "b" in sampled[0] and sampled[0] != sampled[1]  # the temperature and the seed reach the sampler
  # top-p 0.5 keeps 'a' (0.6) alone: greedy text again, at the seed that sampled a 'b'
  assert _printed_sample(capsys, sample_temperature=1.0, sample_top_p=0.5, sample_seed=0) == "a" * 17


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("sample_tokens", 0, "config.sample_tokens=0 must be >= 1"),
        ("sample_temperature", -0.5, r"config.sample_temperature=-0.5 must be >= 0"),
        ("sample_top_p", 1.5, r"config.sample_top_p=1.5 must be in \(0, 1\]"),
    ],
)
def test_bad_sample_settings_name_the_key(key, value, message):
  train_main = importlib.import_module("train.__main__")
  with pytest.raises(validation.ConfigError, match=message):
    train_main.sample_of(common.train_config(sample_prompt="a", **{key: value}))
