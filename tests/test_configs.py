"""Config helpers: arg parsing, model presets as config data, start-up validation with named keys."""

import importlib
from pathlib import Path

import ml_collections
import pytest

import model
from configs import common, validation

ROOT = Path(__file__).resolve().parents[1]


def test_parse_arg_casts_to_the_default_types():
  arg = common.parse_arg("model=llama3.2-1b,runlocal=True,steps=20,lr=3e-4", model="tiny", runlocal=False, steps=0,
                         lr=1.0)
  assert (arg.model, arg.runlocal, arg.steps, arg.lr) == ("llama3.2-1b", True, 20, 3e-4)
  assert common.parse_arg(None, model="tiny").model == "tiny"


@pytest.mark.parametrize(
    "arg,message",
    [("modle=x", "config arg key 'modle' is unknown"), ("steps=ten", "steps='ten' is not a int"),
     ("runlocal=maybe", "runlocal='maybe' is not a bool"), ("steps", "not key=value")],
)
def test_parse_arg_errors_name_the_key(arg, message):
  with pytest.raises(ValueError, match=message):
    common.parse_arg(arg, model="tiny", runlocal=False, steps=0)


def test_model_config_takes_the_preset_and_overrides():
  cfg = common.model_config("llama3.2-1b", num_layers=2)
  built = validation.build_model_config(cfg)
  assert built == model.get_preset("llama3.2-1b", num_layers=2)
  cfg.preset = "qwen2.5-0.5b"  # switching the preset switches every field not overridden
  assert validation.build_model_config(cfg) == model.get_preset("qwen2.5-0.5b", num_layers=2)


def test_model_overrides_are_typed_like_command_line_flags():
  cfg = common.model_config("tiny")
  cfg.num_layers = 4
  with pytest.raises(TypeError):
    cfg.num_layers = "four"
  cfg.rope_theta = 500  # an int where a float is expected is fine
  assert validation.build_model_config(cfg).rope_theta == 500.0


def test_model_config_errors_name_the_key():
  with pytest.raises(ValueError, match="config.model has unknown key"):
    common.model_config("tiny", num_layerz=2)
  with pytest.raises(ValueError, match="config.model.preset='gpt5' is unknown"):
    common.model_config("gpt5")
  bad = common.model_config("tiny")
  bad.num_heads = 3
  with pytest.raises(validation.ConfigError, match="config.model.*num_heads=3 is not divisible by num_kv_heads=2"):
    validation.build_model_config(bad)
  bad = ml_collections.ConfigDict({"preset": "tiny", "num_layerz": 2})
  with pytest.raises(validation.ConfigError, match="config.model.num_layerz is not a ModelConfig field"):
    validation.build_model_config(bad)


def test_check_keys_catches_typos_and_wrong_types():
  reference = {"total_steps": 100, "optimizer": {"learning_rate": 1e-3, "name": "adamw"}, "init_from": None}
  validation.check_keys({"total_steps": 5, "optimizer": {"learning_rate": 1}, "init_from": "dir"}, reference)
  with pytest.raises(validation.ConfigError, match=r"config.optimizer.learning_rat is not a known key"):
    validation.check_keys({"optimizer": {"learning_rat": 1e-3}}, reference)
  with pytest.raises(validation.ConfigError, match=r"config.total_steps='100' has type str, expected int"):
    validation.check_keys({"total_steps": "100"}, reference)
  with pytest.raises(validation.ConfigError, match=r"config.total_steps=True has type bool"):
    validation.check_keys({"total_steps": True}, reference)


def test_check_mesh_resolves_and_names_bad_axes():
  assert validation.check_mesh(common.mesh_config(data=-1, tensor=2), 8) == {
      "data": 4, "fsdp": 1, "tensor": 2, "sequence": 1
  }
  with pytest.raises(validation.ConfigError, match=r"config.mesh sizes .* multiply to 6, but there are 8 devices"):
    validation.check_mesh({"data": 3, "tensor": 2}, 8)
  with pytest.raises(validation.ConfigError, match=r"config.mesh.fsdp='2' must be a positive int"):
    validation.check_mesh({"fsdp": "2"}, 8)


def test_sharding_rules_check():
  validation.check_sharding_rules(common.sharding_rules())
  with pytest.raises(validation.ConfigError, match=r"config.sharding_rules\[0\] \('embed'\) names unknown mesh axes"):
    validation.check_sharding_rules((("embed", ("model",)),))



# The training experiments (configs/infer's generate.py needs a checkpoint: tests/test_infer_cli.py).
CONFIG_FILES = sorted(str(p.relative_to(ROOT)) for d in ("align", "pretrain") for p in (ROOT / "configs" / d).glob("*.py")
                      if p.name not in ("__init__.py", "common.py", "experiments.py"))


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_experiment_config_loads_and_validates(path):
  """Each experiment file's defaults pass its entry point's validation (the keys and values, not the paths)."""
  from align import run as align_run
  from train import trainer

  config = importlib.import_module(path[:-3].replace("/", ".")).get_config()
  if path == "configs/align/compute_curves.py":  # an evaluation of runs (align/compute_curves.py), not a training run
    from align import compute_curves

    compute_curves.validate(config)
  elif "method" in config:
    if not config.task.name:  # a generic file: the task and the starting point come from the command line
      config.task.name, config.init_from = "arithmetic", "runs/sft"
      if config.method == "distill":
        config.distill.teacher = "runs/sft"
    align_run.validate(config)
  else:
    trainer.validate(config)
