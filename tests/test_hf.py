"""Hugging Face interop: logits of committed transformers fixtures, round trips, both config conventions.

The fixtures (tests/fixtures/hf/*) are tiny random models that transformers itself saved, with the
logits transformers computed; tests/fixtures/make_hf_fixtures.py makes them (torch needed there only).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from flax import nnx

from model import Transformer, hf, positional, sharding

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ["llama", "llama3_rope", "llama_dynamic_rope", "llama_yarn_rope", "mistral", "qwen2", "gemma", "gemma2"]


def _reference(name):
  return np.load(FIXTURES / name / "reference.npz")


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name):
  module = hf.from_pretrained(FIXTURES / name)
  ref = _reference(name)
  logits = np.asarray(module(ref["tokens"]))
  assert logits.shape == ref["logits"].shape
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)


def test_fixtures_exercise_what_they_claim():
  mistral = hf.from_pretrained(FIXTURES / "mistral").config
  assert 0 < mistral.sliding_window < _reference("mistral")["tokens"].shape[1]
  assert mistral.num_kv_heads == 1
  gemma2 = hf.from_pretrained(FIXTURES / "gemma2").config
  assert gemma2.attn_logit_softcap and gemma2.final_logit_softcap and gemma2.global_layer_every == 2
  assert hf.from_pretrained(FIXTURES / "llama3_rope").config.rope_scaling == "llama3"
  assert hf.from_pretrained(FIXTURES / "qwen2").config.qkv_bias
  assert (FIXTURES / "llama3_rope" / "model.safetensors.index.json").exists()


def test_rope_extension_fixtures_exercise_their_scaling():
  dynamic = hf.from_pretrained(FIXTURES / "llama_dynamic_rope").config
  assert dynamic.rope_scaling == "dynamic_ntk" and dynamic.rope_scaling_factor == 4.0
  rows = _reference("llama_dynamic_rope")["tokens"].shape[1]
  assert dynamic.max_position_embeddings < rows  # the base grows: logits differ from plain rope's
  yarn = hf.from_pretrained(FIXTURES / "llama_yarn_rope").config
  assert (yarn.rope_scaling, yarn.rope_scaling_factor, yarn.rope_original_max_len) == ("yarn", 4.0, 2048)
  ratio = positional.rope_inverse_frequencies(yarn) / positional.rope_inverse_frequencies(yarn.replace(rope_scaling="none"))
  assert ratio[0] == 1.0 and ratio[-1] == 0.25 and np.any((ratio < 1.0) & (ratio > 0.25))  # kept, ramped, interpolated
  assert positional.rope_attention_factor(yarn) == pytest.approx(0.1 * np.log(4.0) + 1.0)


def _rope_frequencies_float64(theta, head_dim):
  return theta ** -(np.arange(0, head_dim, 2) / head_dim)


def test_ntk_is_plain_rope_with_the_base_changed_and_exports_so(tmp_path):
  """Static NTK-aware scaling (no transformers type of its own): base * factor^(H / (H - 2)), the
  closed form; its export is a plain-rope checkpoint with that base, which reloads to the same logits."""
  source = hf.from_pretrained(FIXTURES / "llama")
  config = source.config.replace(rope_scaling="ntk", rope_scaling_factor=8.0)
  h = config.head_dim
  base = config.rope_theta * 8.0 ** (h / (h - 2))
  np.testing.assert_allclose(positional.rope_inverse_frequencies(config), _rope_frequencies_float64(base, h), rtol=1e-12)
  ntk = nnx.merge(nnx.graphdef(Transformer(config, rngs=nnx.Rngs(0))), nnx.state(source))
  tokens = _reference("llama")["tokens"]
  hf.save_pretrained(ntk, tmp_path / "ntk")
  exported = json.loads((tmp_path / "ntk" / "config.json").read_text())
  assert "rope_scaling" not in exported and exported["rope_theta"] == pytest.approx(base)
  np.testing.assert_allclose(np.asarray(hf.from_pretrained(tmp_path / "ntk")(tokens)), np.asarray(ntk(tokens)), atol=1e-5)
  assert not np.allclose(np.asarray(ntk(tokens)), np.asarray(source(tokens)), atol=1e-3)


def test_dynamic_ntk_base_follows_the_length():
  """dynamic_ntk against its closed form: the plain frequencies up to max_position_embeddings,
  then base * (factor * L / max_len - (factor - 1))^(H / (H - 2)) for the length L = max position + 1."""
  config = hf.from_pretrained(FIXTURES / "llama_dynamic_rope").config
  h, m, f = config.head_dim, config.max_position_embeddings, config.rope_scaling_factor
  for length in (m - 3, m, m + 1, 3 * m):
    positions = np.arange(length)[None]
    got = np.asarray(positional.rope_inverse_frequencies(config, positions))
    scaled = max(length, m)
    base = config.rope_theta * (f * scaled / m - (f - 1)) ** (h / (h - 2))
    np.testing.assert_allclose(got, _rope_frequencies_float64(base, h), rtol=2e-6, err_msg=f"L={length}")


def test_unscanned_layers_load_the_same():
  ref = _reference("gemma2")
  module = hf.from_pretrained(FIXTURES / "gemma2", scan_layers=False)
  np.testing.assert_allclose(np.asarray(module(ref["tokens"])), ref["logits"], atol=1e-4, rtol=0)


def test_sharded_load_places_shards_and_keeps_logits():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  module = hf.from_pretrained(FIXTURES / "llama", mesh=mesh)
  w_gate = module.layers.mlp.w_gate.get_value()
  assert w_gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert w_gate.addressable_shards[0].data.shape == (2, 64 // 4, 128 // 2)
  ref = _reference("llama")
  np.testing.assert_allclose(np.asarray(module(ref["tokens"])), ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_writes_the_same_tensors(name, tmp_path):
  src = FIXTURES / name
  hf.save_pretrained(hf.from_pretrained(src), tmp_path / "out", max_shard_bytes=60_000)
  original, saved = {}, {}
  for file in src.glob("*.safetensors"):
    original.update(load_file(file))
  for file in (tmp_path / "out").glob("*.safetensors"):
    saved.update(load_file(file))
  tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings")
  if tied:
    original.pop("lm_head.weight", None)
  assert sorted(saved) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(saved[key], value, err_msg=key)
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  source = json.loads((src / "config.json").read_text())
  for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "tie_word_embeddings"):
    assert written[key] == source.get(key, written[key]), key
  # And the written directory loads back to the same logits.
  ref = _reference(name)
  np.testing.assert_allclose(
      np.asarray(hf.from_pretrained(tmp_path / "out")(ref["tokens"])), ref["logits"], atol=1e-4, rtol=0
  )


def test_transformers_4_and_5_config_conventions_agree():
  v5 = json.loads((FIXTURES / "llama3_rope" / "config.json").read_text())
  rope = v5.get("rope_parameters") or v5.get("rope_scaling")
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
  v4["rope_theta"] = rope["rope_theta"] if "rope_theta" in rope else v5["rope_theta"]
  v4["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  v4["rope_scaling"]["type"] = v4["rope_scaling"].pop("rope_type")  # the oldest spelling
  v4["torch_dtype"] = "float32"
  assert hf.config_from_hf(v4) == hf.config_from_hf(v5)
  assert hf.config_from_hf(v5).rope_scaling == "llama3"


def test_bad_checkpoints_raise_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.from_pretrained(tmp_path / "nowhere")
  bad = tmp_path / "bad"
  shutil.copytree(FIXTURES / "llama", bad)
  config = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
    hf.from_pretrained(bad)
  (bad / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}}))
  with pytest.raises(ValueError, match="rope scaling type 'longrope'"):
    hf.from_pretrained(bad)
  (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
  with pytest.raises(KeyError, match="model.layers.2"):
    hf.from_pretrained(bad)
  (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
  with pytest.raises(ValueError, match="does not use.*model.layers.1"):
    hf.from_pretrained(bad)


def test_unexportable_configs_say_why():
  from model import get_preset

  with pytest.raises(ValueError, match="position='alibi'"):
    hf.hf_family(get_preset("tiny", position="alibi"))
  assert hf.hf_family(get_preset("gemma-2b")) == "gemma"
  assert hf.hf_family(get_preset("mistral-7b")) == "mistral"
  assert hf.hf_family(get_preset("qwen2.5-7b")) == "qwen2"
