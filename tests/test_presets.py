"""Every preset's shapes via jax.eval_shape (nothing allocated), against published parameter counts."""

import jax
import pytest
from flax import nnx

import model

# Published totals (model cards / Hugging Face safetensors metadata), not computed by our code.
PUBLISHED_PARAMS = {
    "llama3.2-1b": 1_235_814_400,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-2b": 2_506_172_416,
    "gemma2-9b": 9_241_705_984,
}


def test_every_preset_is_listed():
  assert set(model.PRESETS) == set(PUBLISHED_PARAMS) | {"tiny"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_count_matches_published(name):
  config = model.get_preset(name)
  abstract = nnx.eval_shape(lambda: model.Transformer(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)  # nothing was allocated
  assert sum(leaf.size for leaf in leaves) == PUBLISHED_PARAMS[name]
  assert model.param_count(config) == PUBLISHED_PARAMS[name]


def test_tiny_preset_counts_its_parameters():
  config = model.get_preset("tiny", qkv_bias=True, post_norms=True, norm="layer", tie_embeddings=True)
  abstract = nnx.eval_shape(lambda: model.Transformer(config, rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == model.param_count(config)


def test_flops_per_token_is_6n_plus_attention():
  # Llama 3.1 8B at 8192 tokens, by hand: N without the input embedding and the 65 RMSNorm
  # vectors, times 6, plus 12 * L * (N_heads * H) * T for the attention scores and values.
  seq = 8192
  non_embedding = 8_030_261_248 - 128_256 * 4096 - (2 * 32 + 1) * 4096
  expected = 6 * non_embedding + 12 * 32 * (32 * 128) * seq
  assert model.flops_per_token(model.get_preset("llama3.1-8b"), seq) == pytest.approx(expected, rel=1e-12)
  # Tied embeddings: the one matrix is the output projection, so it counts.
  tied = 1_235_814_400 - (2 * 16 + 1) * 2048
  expected_tied = 6 * tied + 12 * 16 * (32 * 64) * seq
  assert model.flops_per_token(model.get_preset("llama3.2-1b"), seq) == pytest.approx(expected_tied, rel=1e-12)


def test_get_preset_errors_name_the_problem():
  with pytest.raises(ValueError, match="Unknown model preset 'llama9'"):
    model.get_preset("llama9")
  with pytest.raises(ValueError, match="num_layerz"):
    model.get_preset("tiny", num_layerz=3)
  with pytest.raises(ValueError, match="num_heads=6 is not divisible by num_kv_heads=4"):
    model.get_preset("tiny", num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    model.get_preset("tiny", attention_impl="flash")
