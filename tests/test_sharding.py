"""Sharded logits equal unsharded logits on 8 fake CPU devices; meshes and rules behave."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import model
from model import sharding

# 8 query heads so tensor=8 really splits them; 4 kv heads then stay whole (replicated).
CONFIG = model.get_preset("tiny", num_heads=8, num_kv_heads=4, head_dim=8)


def _make():
  return model.Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (8, 16), 0, CONFIG.vocab_size)


@pytest.fixture(scope="module")
def unsharded_logits(tokens):
  return np.asarray(_make()(tokens))


@pytest.mark.parametrize(
    "mesh_sizes,expected_wq_spec",
    [
        ({"data": 8}, P(None, None, None, None)),
        ({"fsdp": 8}, P(None, "fsdp", None, None)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, P(None, "fsdp", "tensor", None)),
        ({"tensor": 8}, P(None, None, "tensor", None)),
    ],
)
def test_sharded_logits_equal_unsharded(mesh_sizes, expected_wq_spec, tokens, unsharded_logits):
  mesh = sharding.make_mesh(mesh_sizes)
  module = sharding.create_sharded(_make, mesh)
  wq = module.layers.attn.wq.get_value()
  assert wq.sharding.spec == expected_wq_spec  # [L, D, N, H], born sharded

  @nnx.jit
  def forward(module, tokens):
    with sharding.axis_rules(mesh):
      return module(tokens)

  logits = forward(module, tokens)
  np.testing.assert_allclose(np.asarray(logits), unsharded_logits, atol=1e-5, rtol=0)


def test_make_mesh_fills_the_rest_and_uses_auto_axes():
  mesh = sharding.make_mesh({"data": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "sizes,message",
    [
        ({"data": 3}, r"multiply to 3, but there are 8 devices"),
        ({"data": -1, "fsdp": 3}, r"mesh.data=-1 cannot take the rest"),
        ({"data": -1, "fsdp": -1}, r"at most one axis"),
        ({"model": 8}, r"unknown axis \['model'\]"),
        ({"data": 0}, r"mesh.data=0 must be a positive int"),
    ],
)
def test_make_mesh_errors_name_the_axis(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(sizes)


def test_indivisible_dimensions_stay_replicated():
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  # 2 kv heads cannot split 4 ways; 8 query heads can; a mesh axis is used once per array.
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh, sharding.DEFAULT_RULES) == P(None, None, None)
  assert sharding.logical_to_spec(("q_heads", "mlp"), (8, 16), mesh, sharding.DEFAULT_RULES) == P("tensor", None)
  assert sharding.logical_to_spec(("activation_batch", "activation_length"), (6, 4), mesh, sharding.DEFAULT_RULES) == P(
      "data", None
  )


def test_rules_name_unknown_axes_clearly():
  mesh = sharding.make_mesh({"data": 8})
  with pytest.raises(ValueError, match="logical axis 'experts' has no sharding rule"):
    sharding.logical_to_spec(("experts",), (8,), mesh, sharding.DEFAULT_RULES)
  with pytest.raises(ValueError, match=r"names unknown mesh axes \['model'\]"):
    sharding.logical_to_spec(("embed",), (8,), mesh, (("embed", ("model",)),))


# Query heads (8) over two mesh axes, kv heads (2) over only the one that divides them (the batch
# kept off fsdp so that the heads get it): kv heads whole on every shard instead.
_TWO_AXIS_HEADS = sharding.with_default_rules(
    [("activation_batch", ("data",)), ("activation_heads", ("tensor", "fsdp")),
     ("activation_kv_heads", ("tensor", "fsdp"))])


@pytest.mark.parametrize(
    "mesh_sizes,heads,rules",
    [({"data": 2, "fsdp": 2, "tensor": 2}, (8, 4), sharding.DEFAULT_RULES),  # batch and both head kinds split
     ({"tensor": 8}, (8, 4), sharding.DEFAULT_RULES),  # 8 query heads split, 4 kv heads whole: each takes its own
     ({"data": 4, "tensor": 2}, (12, 3), sharding.DEFAULT_RULES),  # 6 heads a shard straddle groups of 4: gathered
     ({"fsdp": 2, "sequence": 4}, (8, 4), sharding.DEFAULT_RULES),  # sequence sharding gathered for the kernel
     ({"fsdp": 4, "tensor": 2}, (8, 2), _TWO_AXIS_HEADS)],
    ids=["batch_and_heads", "query_heads_only", "straddling_groups", "sequence", "heads_over_two_axes"],
)
def test_pallas_attention_runs_per_shard_and_matches_unsharded_xla(mesh_sizes, heads, rules):
  """attention_impl='pallas' on a mesh: the kernel runs inside shard_map over the activations'
  batch and head shards (one Pallas call cannot be split by XLA's partitioner), and the loss and
  its gradients equal the unsharded plain-jnp model's; packed segments, a window and soft-cap."""
  config = CONFIG.replace(num_heads=heads[0], num_kv_heads=heads[1], sliding_window=6, attn_logit_softcap=20.0)
  tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, config.vocab_size)
  segments = np.asarray([[1] * 5 + [2] * 11, [1] * 16, [1] * 9 + [2] * 7, [1] * 16])

  def loss(module, tokens):
    return jax.numpy.mean(jax.numpy.sin(module(tokens, segment_ids=segments)))

  def make(impl):
    return lambda: model.Transformer(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))

  expected_loss, expected_grads = nnx.value_and_grad(loss)(make("xla")(), tokens)
  mesh = sharding.make_mesh(mesh_sizes)
  module = sharding.create_sharded(make("pallas"), mesh, rules)

  def sharded_loss_and_grads(module, tokens):
    with sharding.axis_rules(mesh, rules):
      return nnx.value_and_grad(loss)(module, tokens)

  graph, state = nnx.split(module)
  jaxpr = jax.make_jaxpr(lambda state: sharded_loss_and_grads(nnx.merge(graph, state), tokens))(state)
  assert "shard_map" in str(jaxpr)
  got_loss, got_grads = nnx.jit(sharded_loss_and_grads)(module, tokens)
  np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(nnx.state(got_grads)), jax.tree.leaves(nnx.state(expected_grads))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
