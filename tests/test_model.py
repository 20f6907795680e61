"""The decoder's behaviour: packing isolation, rope against float64, remat, dtypes, backends."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model
from model import positional, projections, transformer

CONFIG = model.get_preset("tiny", sliding_window=6)  # windowed, GQA: the paths packing must respect


@pytest.fixture(scope="module")
def tiny():
  return model.Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, tokens, segment_ids: m(tokens, segment_ids=segment_ids))


def test_packed_row_equals_documents_run_alone(tiny, forward):
  doc_a = jax.random.randint(jax.random.key(1), (5,), 0, CONFIG.vocab_size)
  doc_b = jax.random.randint(jax.random.key(2), (11,), 0, CONFIG.vocab_size)
  packed = jnp.concatenate([doc_a, doc_b])[None]
  segments = jnp.asarray([[1] * 5 + [2] * 11])
  logits = forward(tiny, packed, segments)
  alone_a = tiny(doc_a[None])
  alone_b = tiny(doc_b[None])
  np.testing.assert_allclose(logits[0, :5], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:], alone_b[0], atol=1e-5)


def test_changing_one_document_changes_no_logit_of_another(tiny, forward):
  tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, CONFIG.vocab_size)
  segments = jnp.asarray([[1] * 6 + [2] * 10, [1] * 9 + [2] * 4 + [3] * 3])
  before = forward(tiny, tokens, segments)
  changed = tokens.at[0, 6:].set((tokens[0, 6:] + 7) % CONFIG.vocab_size).at[1, :9].set(0)
  after = forward(tiny, changed, segments)
  np.testing.assert_array_equal(before[0, :6], after[0, :6])  # doc 1 of row 0 untouched
  np.testing.assert_array_equal(before[1, 9:], after[1, 9:])  # docs 2, 3 of row 1 untouched
  assert np.abs(before[0, 6:] - after[0, 6:]).max() > 1e-3  # the changed document did change


def test_segment_positions_restart_per_document():
  segments = jnp.asarray([[1, 1, 1, 2, 2, 3], [4, 4, 4, 4, 4, 4]])
  np.testing.assert_array_equal(transformer.segment_positions(segments), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


def test_rope_matches_float64_rotation_of_pairs():
  config = model.get_preset("tiny", rope_theta=500.0)
  x = jax.random.normal(jax.random.key(0), (1, 7, 2, config.head_dim))
  positions = jnp.arange(7)[None] * 3
  out = np.asarray(positional.apply_rope(x, positions, positional.rope_inverse_frequencies(config)))
  xs, half = np.asarray(x, np.float64), config.head_dim // 2
  expected = np.empty_like(xs)
  for t in range(7):
    for i in range(half):  # dimension i rotates with dimension i + H/2 by angle p * theta^(-2i/H)
      angle = 3 * t * 500.0 ** (-2 * i / config.head_dim)
      c, s = np.cos(angle), np.sin(angle)
      expected[0, t, :, i] = xs[0, t, :, i] * c - xs[0, t, :, i + half] * s
      expected[0, t, :, i + half] = xs[0, t, :, i + half] * c + xs[0, t, :, i] * s
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_linear_rope_scaling_divides_positions():
  base = model.get_preset("tiny")
  scaled = base.replace(rope_scaling="linear", rope_scaling_factor=4.0)
  np.testing.assert_allclose(
      positional.rope_inverse_frequencies(scaled), positional.rope_inverse_frequencies(base) / 4.0
  )


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_neither_logits_nor_gradients(policy):
  tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 256)

  def loss_and_grad(config):
    m = model.Transformer(config, rngs=nnx.Rngs(0))
    return nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(tokens) ** 2)))(m)  # jitted: one compile, not one per op

  loss, grads = loss_and_grad(model.get_preset("tiny"))
  loss_remat, grads_remat = loss_and_grad(model.get_preset("tiny", remat_policy=policy))
  np.testing.assert_allclose(loss, loss_remat, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_remat_keeps_the_pallas_kernel_in_the_training_program(policy):
  """A remat policy must not turn a static window into a traced one, which the fused backends
  refuse (they fall back to plain attention, with its [B, N, T, S] logits, silently)."""
  config = model.get_preset("tiny", attention_impl="pallas", remat_policy=policy, sliding_window=4)
  m = model.Transformer(config, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 8), jnp.int32)
  jaxpr = jax.make_jaxpr(nnx.grad(lambda m: jnp.mean(m(tokens, segment_ids=jnp.ones_like(tokens)))))(m)
  assert "pallas_call" in str(jaxpr)


def test_bfloat16_compute_tracks_float32():
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, 256)
  f32 = model.Transformer(model.get_preset("tiny", init_std=0.1), rngs=nnx.Rngs(0))
  bf16 = model.Transformer(model.get_preset("tiny", init_std=0.1, dtype="bfloat16"), rngs=nnx.Rngs(0))
  out16 = bf16(tokens)
  assert out16.dtype == jnp.float32  # logits are always float32
  assert bf16.embedding.get_value().dtype == jnp.float32  # params stay in param_dtype
  np.testing.assert_allclose(out16, f32(tokens), atol=0.05)


def test_cudnn_backend_falls_back_on_cpu_to_the_same_logits(tiny):
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, 256)
  cudnn = model.Transformer(CONFIG.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(cudnn(tokens), tiny(tokens), atol=1e-6)


def test_bad_tokens_shape_is_a_clear_error(tiny):
  with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
    tiny(jnp.zeros((8,), jnp.int32))


def test_pallas_backend_matches_xla_logits_and_gradients():
  config = model.get_preset("tiny", sliding_window=6, attn_logit_softcap=20.0)
  tokens = jax.random.randint(jax.random.key(7), (2, 16), 0, 256)
  segments = jnp.asarray([[1] * 5 + [2] * 11, [1] * 16])

  def loss_and_grads(impl):
    m = model.Transformer(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))
    return nnx.value_and_grad(lambda m: jnp.mean(jnp.sin(m(tokens, segment_ids=segments))))(m)

  loss_xla, grads_xla = loss_and_grads("xla")
  loss_pallas, grads_pallas = loss_and_grads("pallas")
  np.testing.assert_allclose(loss_pallas, loss_xla, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_pallas), jax.tree.leaves(grads_xla)):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("eq,x_shape,w_shape", [
    ("BTD,DF->BTF", (2, 5, 8), (8, 12)),
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 8)),
    ("BTD,VD->BTV", (2, 5, 8), (16, 8)),  # a tied head: the weight's input axis last
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_einsum_gradients_equal_autodiffs(eq, x_shape, w_shape, dtype):
  """The projections' hand-written backward pass (model/projections.py) against jax's autodiff of
  the plain einsum, in float32 and in bfloat16 (where the outputs must keep the operands' dtype)."""
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  w = jax.random.normal(kw, w_shape).astype(dtype)
  out_shape = jax.eval_shape(lambda x, w: jnp.einsum(eq, x, w), x, w).shape
  cotangent = jax.random.normal(kc, out_shape).astype(dtype)
  ours, ours_vjp = jax.vjp(lambda x, w: projections.weight_einsum(eq, x, w), x, w)
  theirs, theirs_vjp = jax.vjp(lambda x, w: jnp.einsum(eq, x, w), x, w)
  tolerance = 1e-6 if dtype == "float32" else 2e-2
  # The same product; contracting 'NH' in the weight's order (not einsum's 'HN') sums in another order.
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), rtol=tolerance,
                             atol=tolerance)
  for got, want in zip(ours_vjp(cotangent), theirs_vjp(cotangent)):
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tolerance,
                               atol=tolerance)


def test_unstacked_view_computes_the_same_logits_and_cache(tiny):
  """The decode loop's CPU view of a scanned decoder (its layers as a list) against the model."""
  assert tiny.config.scan_layers
  view = transformer.unstacked(tiny)
  assert not view.config.scan_layers and len(view.layers) == tiny.config.num_layers
  assert tiny.config.scan_layers  # the model itself is left as it was
  tokens = jax.random.randint(jax.random.key(7), (2, 10), 0, tiny.config.vocab_size)
  forward = nnx.jit(lambda m, tokens: m(tokens))  # jitted: a compile per model, not one per op
  np.testing.assert_allclose(forward(view, tokens), forward(tiny, tokens), atol=2e-5, rtol=2e-5)
  cache = tiny.init_cache(2, 16)
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  cached = nnx.jit(lambda m, tokens, positions, cache: m(tokens, positions=positions, cache=cache))
  (logits, ours) = cached(view, tokens, positions, cache)
  (want, theirs) = cached(tiny, tokens, positions, cache)
  np.testing.assert_allclose(logits, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(ours.k, theirs.k, atol=2e-5, rtol=2e-5)


def test_shifted_sparse_groups_apply_without_a_cache_only(tiny):
  """S^2-Attn in the decoder: groups longer than twice the row are one group for both halves of the
  heads, so the logits are full attention's; groups of 4 change them; a cached prefill and decode
  attend fully whatever the group."""
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, CONFIG.vocab_size)
  state = nnx.state(tiny)

  def with_group(group):
    return nnx.merge(nnx.graphdef(model.Transformer(CONFIG.replace(shifted_sparse_group=group), rngs=nnx.Rngs(0))), state)

  full = np.asarray(tiny(tokens))
  np.testing.assert_allclose(with_group(24)(tokens), full, atol=1e-5)
  sparse = with_group(4)
  assert not np.allclose(sparse(tokens), full, atol=1e-3)
  logits, _ = sparse(tokens, cache=sparse.init_cache(2, 16))  # a prefill: full attention
  np.testing.assert_allclose(logits, full, atol=1e-5)
  with pytest.raises(ValueError, match="shifted_sparse_group=4 needs"):
    CONFIG.replace(num_heads=3, num_kv_heads=1, shifted_sparse_group=4)
