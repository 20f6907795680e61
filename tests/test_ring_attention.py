"""Ring attention over 8 fake CPU devices against single-device attention_ops (impl='xla')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from model import attention_ops, ring_attention, sharding

B, T, N, K, H = 2, 64, 4, 2, 8  # GQA: 4 query heads on 2 kv heads
SEGMENTS = np.repeat(np.array([[1, 2, 3], [1, 1, 2]]), [20, 30, 14], axis=1)  # packed rows, ragged documents


@pytest.fixture(scope="module")
def inputs():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k = jax.random.normal(keys[1], (B, T, K, H))
  v = jax.random.normal(keys[2], (B, T, K, H))
  return q, k, v, jnp.asarray(SEGMENTS, jnp.int32)


def _loss(attend):
  return lambda q, k, v, seg: jnp.sum(jnp.sin(attend(q, k, v, seg)))  # non-uniform output cotangents


@pytest.mark.parametrize(
    "mesh_sizes,causal,window,softcap",
    [
        ({"sequence": 2, "data": 4}, True, 0, 0.0),
        ({"sequence": 4, "data": 2}, False, 0, 0.0),
        ({"sequence": 8}, True, 10, 2.0),  # 2P = 16 chunks of 4 tokens; window and soft-cap
        ({"sequence": 4, "tensor": 2}, True, 24, 0.0),  # heads stay split over 'tensor' inside the ring
    ],
)
def test_matches_single_device_attention(inputs, mesh_sizes, causal, window, softcap):
  mesh = sharding.make_mesh(mesh_sizes)
  kwargs = dict(causal=causal, sliding_window=window, logit_softcap=softcap)

  def reference(q, k, v, seg):
    return attention_ops.dot_product_attention(q, k, v, impl="xla", q_segment_ids=seg, kv_segment_ids=seg, **kwargs)

  def ring(q, k, v, seg):
    with sharding.axis_rules(mesh):
      q = sharding.shard(q, attention_ops.BTNH)
      k, v = (sharding.shard(x, attention_ops.BTKH) for x in (k, v))
      return ring_attention.ring_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, **kwargs)

  expected = jax.jit(reference)(*inputs)
  grads_expected = jax.jit(jax.grad(_loss(reference), argnums=(0, 1, 2)))(*inputs)
  placed = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec()))
  np.testing.assert_allclose(jax.jit(ring)(*placed), expected, atol=1e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(_loss(ring), argnums=(0, 1, 2)))(*placed)
  for name, got, want in zip(("dq", "dk", "dv"), grads, grads_expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_zigzag_layout_balances_causal_work():
  """Shard d holds chunks d and 2P-1-d, and every shard has the same number of visible causal pairs."""
  seq_len, shards = 32, 4
  order = ring_attention.zigzag_indices(seq_len, shards)
  np.testing.assert_array_equal(np.sort(order), np.arange(seq_len))
  blocks = order.reshape(shards, -1)  # [P, T/P] positions on each shard
  np.testing.assert_array_equal(blocks[1], np.r_[4:8, 24:28])
  visible = [(blocks[d][:, None] >= np.arange(seq_len)[None]).sum() for d in range(shards)]
  assert len(set(visible)) == 1, visible


def test_errors_name_the_values(inputs):
  q, k, v, _ = inputs
  mesh = sharding.make_mesh({"sequence": 8})
  with pytest.raises(ValueError, match="seq_len=40"):
    ring_attention.ring_attention(q[:, :40], k[:, :40], v[:, :40], mesh=mesh)
  with pytest.raises(ValueError, match="needs a mesh"):
    ring_attention.ring_attention(q, k, v)
  with pytest.raises(ValueError, match="self-attention"):
    ring_attention.ring_attention(q, k[:, :32], v[:, :32], mesh=mesh)


def test_memory_per_device_falls_with_ring_size():
  """Temp memory of the compiled forward and backward, per device, at T where the scores dominate.

  A device holds one (query chunk, key chunk) block of scores, [T/2P, T/2P], at a time, so temp
  memory falls as fast as 1/P (about 1/P^2 once the scores dominate)."""
  shape = jax.ShapeDtypeStruct((1, 2048, 2, 8), jnp.float32)
  kv_shape = jax.ShapeDtypeStruct((1, 2048, 1, 8), jnp.float32)
  temp = {}
  for shards in (1, 2, 4, 8):
    mesh = sharding.make_mesh({"sequence": shards}, jax.devices()[:shards])

    def attend(q, k, v, mesh=mesh):
      return ring_attention.ring_attention(q, k, v, mesh=mesh, causal=True)

    def grads(q, k, v, attend=attend):
      return jax.grad(lambda *x: attend(*x).sum(), argnums=(0, 1, 2))(q, k, v)

    temp[shards] = tuple(jax.jit(f).lower(shape, kv_shape, kv_shape).compile().memory_analysis().temp_size_in_bytes
                         for f in (attend, grads))
  for shards in (2, 4, 8):
    for forward_or_backward in range(2):
      assert temp[shards][forward_or_backward] <= 1.25 * temp[1][forward_or_backward] / shards, temp
