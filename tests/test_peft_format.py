"""Hugging Face PEFT interop (model.peft.save_adapter / load_adapter, model/peft_format.py) against
committed fixtures: adapters PEFT saved, with the logits PEFT computed, and adapters our
save_adapter wrote, with the logits PEFT computed for them. tests/fixtures/make_peft_fixtures.py
makes them (torch and peft needed there only); every adapter sits on tests/fixtures/hf/llama.
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from model import hf, peft, peft_format, projections, quant

FIXTURES = Path(__file__).parent / "fixtures"
PEFT_DIR = FIXTURES / "peft"
BASE = FIXTURES / "hf" / "llama"
ATOL, RTOL = 1e-4, 1e-5  # the base alone differs from transformers' by ~4e-5 (test_hf uses 1e-4)


def _base(scan_layers=True):
  return hf.from_pretrained(BASE, dtype="float32", param_dtype="float32", scan_layers=scan_layers)


def _reference(name):
  return np.load(PEFT_DIR / name / "reference.npz")


def _config(name):
  return json.loads((PEFT_DIR / name / peft_format.CONFIG_FILE).read_text())


def _scale(config):
  return config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scanned"])
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_peft_adapter_gives_peft_logits(name, scan_layers):
  ref = _reference(name)
  module = peft.load_adapter(_base(scan_layers), PEFT_DIR / name)
  adapters = peft.adapter_modules(module)
  assert {a.use_dora for a in adapters} == {name == "dora"}
  assert {a.scale for a in adapters} == {_scale(_config(name))}  # lora: use_rslora, 8 / sqrt(4)
  logits = np.asarray(module(ref["tokens"]))
  np.testing.assert_allclose(logits, ref["logits"], atol=ATOL, rtol=RTOL)
  base_logits = np.load(BASE / "reference.npz")["logits"]
  assert np.abs(logits - base_logits).max() > 1.0  # the adapter matters


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scanned"])
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_save_adapter_reproduces_peft_files(name, scan_layers, tmp_path):
  module = peft.load_adapter(_base(scan_layers), PEFT_DIR / name)
  peft.save_adapter(module, tmp_path / "out")
  theirs = load_file(PEFT_DIR / name / peft_format.WEIGHTS_FILE)
  ours = load_file(tmp_path / "out" / peft_format.WEIGHTS_FILE)
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.dtype, key
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  theirs, ours = _config(name), json.loads((tmp_path / "out" / peft_format.CONFIG_FILE).read_text())
  for key in ("peft_type", "r", "use_dora", "lora_dropout", "bias", "fan_in_fan_out", "task_type"):
    assert ours[key] == theirs[key], key
  assert set(ours["target_modules"]) == set(theirs["target_modules"])
  assert _scale(ours) == pytest.approx(_scale(theirs), rel=1e-6)
  assert peft_format.from_peft_config(ours) == json.loads((tmp_path / "out" / peft_format.INGREDIENTS_FILE).read_text())


@pytest.mark.parametrize("name, scan_layers", [("ours_lora", True), ("ours_dora", False)])
def test_peft_logits_for_our_adapter_and_a_fresh_save_is_the_same(name, scan_layers, tmp_path):
  ref = _reference(name)
  module = peft.load_adapter(_base(scan_layers), PEFT_DIR / name)
  np.testing.assert_allclose(np.asarray(module(ref["tokens"])), ref["logits"], atol=ATOL, rtol=RTOL)
  peft.save_adapter(module, tmp_path / "out")
  for file in (peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE, peft_format.INGREDIENTS_FILE):
    assert (tmp_path / "out" / file).read_bytes() == (PEFT_DIR / name / file).read_bytes(), file


def test_qlora_adapter_round_trips_with_its_quantized_base(tmp_path):
  config = peft.config(method="qlora", rank=2, alpha=4.0, targets="q_proj,down_proj", quant_type="nf4",
                       block_size=32, double_quant=False)
  module = peft.add_adapters(_base(), config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for adapter in peft.adapter_modules(module):
    adapter.lora_b.set_value(jnp.asarray(rng.normal(0, 0.1, adapter.lora_b.shape), jnp.float32))
  tokens = _reference("lora")["tokens"]
  expected = np.asarray(module(tokens))
  peft.save_adapter(module, tmp_path / "q")
  saved = json.loads((tmp_path / "q" / peft_format.INGREDIENTS_FILE).read_text())
  assert saved == dict(method="qlora", rank=2, alpha=4.0, dropout=0.0, targets="q_proj,down_proj", use_rslora=False,
                       quant_type="nf4", quant_bits=4, block_size=32, double_quant=False, quant_head=False)
  assert _config_of(tmp_path / "q")["use_dora"] is False  # for PEFT a plain LoRA
  loaded = peft.load_adapter(_base(), tmp_path / "q")
  assert quant.is_quantized(loaded)
  np.testing.assert_allclose(np.asarray(loaded(tokens)), expected, atol=1e-5, rtol=1e-6)


def _config_of(path):
  return json.loads((path / peft_format.CONFIG_FILE).read_text())


@pytest.mark.parametrize("method, kind", [("vera", "VeRA"), ("qa_lora", "QALoRA")])
def test_vera_and_qa_lora_cannot_be_saved(method, kind, tmp_path):
  module = peft.add_adapters(_base(), peft.config(method=method, rank=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=f"{kind} adapter; PEFT's format covers LoRA and DoRA"):
    peft.save_adapter(module, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="no adapters"):
    peft.save_adapter(_base(False), tmp_path / "out")


def _copy(name, tmp_path):
  shutil.copytree(PEFT_DIR / name, tmp_path / name)
  return tmp_path / name


@pytest.mark.parametrize("key, value", [
    ("peft_type", "IA3"), ("bias", "all"), ("fan_in_fan_out", True), ("modules_to_save", ["lm_head"]),
    ("layers_to_transform", [0]), ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"v_proj": 2}),
    ("use_qalora", True), ("lora_bias", True), ("init_lora_weights", "pissa"), ("target_modules", ".*proj"),
    ("target_modules", ["q_proj", "query_key_value"]), ("r", 0), ("lora_alpha", "8"), ("a_future_option", 3),
])
def test_bad_adapter_config_is_an_error_naming_the_key(key, value, tmp_path):
  path = _copy("lora", tmp_path)
  config = _config("lora") | {key: value}
  (path / peft_format.CONFIG_FILE).write_text(json.dumps(config))
  module = _base(False)
  with pytest.raises(ValueError, match=f"adapter_config.json.*{key}"):
    peft.load_adapter(module, path)
  assert not peft.has_adapters(module)


def test_peft_config_translation():
  got = peft_format.from_peft_config(dict(peft_type="LORA", r=4, lora_alpha=8, target_modules="all-linear",
                                          lora_dropout=0.05, use_rslora=True, init_lora_weights="gaussian"))
  assert got == dict(method="lora", rank=4, alpha=8.0, dropout=0.05, targets=",".join(projections.PROJECTIONS),
                     use_rslora=True)
  assert peft.settings(got).scale == 4.0
  with pytest.raises(ValueError, match="not valid JSON"):
    peft_format._json(Path(__file__))


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    peft.load_adapter(_base(False), tmp_path)
  shutil.copy(PEFT_DIR / "lora" / peft_format.CONFIG_FILE, tmp_path)
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
    peft.load_adapter(_base(False), tmp_path)


def test_ingredients_file_must_agree_with_adapter_config(tmp_path):
  path = _copy("ours_lora", tmp_path)
  (path / peft_format.CONFIG_FILE).write_text(json.dumps(_config("ours_lora") | {"lora_alpha": 99}))
  with pytest.raises(ValueError, match="disagrees with .*ingredients_peft.json.*alpha"):
    peft.load_adapter(_base(False), path)


def test_tensor_mismatches_name_the_key_and_leave_the_module_as_it_was(tmp_path):
  path = _copy("dora", tmp_path)
  tensors = load_file(path / peft_format.WEIGHTS_FILE)
  gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
  extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
  odd = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
  cases = [
      ({k: v for k, v in tensors.items() if k != gone}, f"missing \\['{gone}'\\]"),
      (tensors | {extra: np.zeros((4, 64), np.float32)}, f"unexpected \\['{extra}'\\]"),
      (tensors | {odd: tensors[odd].T.copy()}, f"{odd} has shape \\(4, 64\\).*needs \\(64, 4\\)"),
  ]
  module = _base(True)
  before = [type(slot.get()) for slot in projections.slots(module)]
  for bad, match in cases:
    save_file(bad, str(path / peft_format.WEIGHTS_FILE))
    with pytest.raises(ValueError, match=match):
      peft.load_adapter(module, path)
    assert [type(slot.get()) for slot in projections.slots(module)] == before
    assert not peft.has_adapters(module)


def test_loading_into_other_adapters_is_an_error(tmp_path):
  module = peft.add_adapters(_base(False), peft.config(method="lora", rank=2, targets="all"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="differ from the adapter at"):
    peft.load_adapter(module, PEFT_DIR / "lora")
  # Matching adapters take the tensors in place.
  module = peft.add_adapters(_base(False), peft.config(method="dora", rank=4, alpha=6.0,
                                                       targets="q_proj,v_proj,o_proj,down_proj"), rngs=nnx.Rngs(1))
  peft.load_adapter(module, PEFT_DIR / "dora")
  peft.save_adapter(module, tmp_path / "again")
  again = load_file(tmp_path / "again" / peft_format.WEIGHTS_FILE)
  for key, value in load_file(PEFT_DIR / "dora" / peft_format.WEIGHTS_FILE).items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
