"""Ring attention over 8 fake CPU devices against single-device attention_ops (impl='xla'), with each
chunk pair in jnp and through the Pallas flash kernel (interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from model import attention_ops, ring_attention, sharding
from pallas_kernels import BlockSizes

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


# Kernel blocks of 8 (its smallest): a chunk of T/2P = 16 positions is two of them, one of 8 is one.
FLASH_BLOCKS = BlockSizes(block_q=8, block_kv=8)


def _check_against_single_device(inputs, mesh_sizes, segments=True, **kwargs):
  """Ring attention (kwargs: ring_attention's) forward and gradients against attention_ops' 'xla' on one device."""
  mesh = sharding.make_mesh(mesh_sizes)
  attention = {name: kwargs.pop(name) for name in ("causal", "sliding_window", "logit_softcap")}
  ids = lambda seg: dict(q_segment_ids=seg, kv_segment_ids=seg) if segments else {}  # noqa: E731

  def reference(q, k, v, seg):
    return attention_ops.dot_product_attention(q, k, v, impl="xla", **ids(seg), **attention)

  def ring(q, k, v, seg):
    with sharding.axis_rules(mesh):
      q = sharding.shard(q, attention_ops.BTNH)
      k, v = (sharding.shard(x, attention_ops.BTKH) for x in (k, v))
      return ring_attention.ring_attention(q, k, v, **ids(seg), **attention, **kwargs)

  expected = jax.jit(reference)(*inputs)
  grads_expected = jax.jit(jax.grad(_loss(reference), argnums=(0, 1, 2)))(*inputs)
  placed = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec()))
  np.testing.assert_allclose(jax.jit(ring)(*placed), expected, atol=1e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(_loss(ring), argnums=(0, 1, 2)))(*placed)
  for name, got, want in zip(("dq", "dk", "dv"), grads, grads_expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


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
  _check_against_single_device(inputs, mesh_sizes, causal=causal, sliding_window=window, logit_softcap=softcap)


@pytest.mark.parametrize(
    "mesh_sizes,causal,window,softcap,segments",
    [
        ({"sequence": 2, "data": 4}, True, 0, 0.0, False),  # zig-zag chunks of 16: diagonal and unmasked pairs
        # Chunks of 8; the window's edge cuts the pairs 1 and 2 chunks below the diagonal: three kernel calls.
        ({"sequence": 4, "tensor": 2}, True, 10, 2.0, True),
        # No zig-zag: blocks of 16, the window cutting those 1 and 2 blocks apart, keys after queries unmasked.
        ({"sequence": 4, "data": 2}, False, 24, 0.0, True),
    ],
    ids=["P2_causal", "P4_causal_window_softcap_segments", "P4_bidirectional_window_segments"],
)
def test_flash_blocks_match_single_device_attention(inputs, mesh_sizes, causal, window, softcap, segments):
  """block_impl='pallas': every pair through the flash kernel (GQA 2, float32, atol = rtol = 1e-5)."""
  _check_against_single_device(inputs, mesh_sizes, segments=segments, causal=causal, sliding_window=window,
                               logit_softcap=softcap, block_impl="pallas", block_sizes=FLASH_BLOCKS)


def test_flash_kinds_against_brute_force_visibility():
  """Each chunk pair's kernel call, from _flash_kinds, against the pair's mask from the definitions:
  a skipped pair sees nothing, and a call's own mask (query t at t + offset, key s at s: s <= t +
  offset when causal, t + offset - s < window) is the pair's; at most four calls per ring."""
  for causal in (True, False):
    for chunk, num_chunks in ((4, 8), (8, 4), (5, 6)):
      for window in (0, 1, 3, 4, 6, 9, 13, 40):
        kinds, table = ring_attention._flash_kinds(causal, window, chunk, num_chunks)
        assert len(kinds) <= 4 and len(table) == 2 * num_chunks - 1, (kinds, table)
        t = np.arange(chunk)[:, None]
        s = np.arange(chunk)[None, :]
        for qc in range(num_chunks):
          for kc in range(num_chunks):
            q_pos, kv_pos = qc * chunk + t, kc * chunk + s
            visible = (kv_pos <= q_pos) if causal else np.ones((chunk, chunk), bool)
            if window:
              visible = visible & (q_pos - kv_pos < window)
            branch = table[qc - kc + num_chunks - 1]
            if branch == 0:
              assert not visible.any(), (causal, chunk, window, qc, kc)
              continue
            kind_causal, kind_window, offset = kinds[branch - 1]
            kernel = (s <= t + offset) if kind_causal else np.ones((chunk, chunk), bool)
            if kind_window:
              kernel = kernel & (t + offset - s < kind_window)
            np.testing.assert_array_equal(kernel, visible, err_msg=str((causal, chunk, window, qc, kc)))


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (shard_map, loops, switch, the kernels' bodies)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def test_flash_blocks_store_no_block_of_scores(inputs):
  """Forward and backward of the P=2 causal ring, traced: with 'xla' blocks some float32 value is a
  [..., T/2P, T/2P] block of scores; with 'pallas' none is, and the kernel's three calls are there.
  T = 48: chunks of 12, which no other dimension is (the kernel pads them to 16 rows, and its GPU
  branch the head dim to 16)."""
  mesh = sharding.make_mesh({"sequence": 2}, jax.devices()[:2])
  seq_len = 48
  chunk = seq_len // 4

  def equations(block_impl):
    def loss(q, k, v):
      return ring_attention.ring_attention(q, k, v, mesh=mesh, block_impl=block_impl, block_sizes=FLASH_BLOCKS).sum()

    q, k, v = (x[:, :seq_len] for x in inputs[:3])
    return list(_equations(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))

  def scores(eqns):
    return [v.aval.shape for eqn in eqns for v in eqn.outvars
            if v.aval.dtype == jnp.float32 and v.aval.shape[-2:] == (chunk, chunk)]

  assert scores(equations("xla"))
  flash = equations("pallas")
  assert not scores(flash), scores(flash)
  kernels = {str(eqn.params.get("name", eqn.params.get("name_and_src_info"))) for eqn in flash
             if eqn.primitive.name == "pallas_call"}
  for name in ("flash_attention_forward", "flash_attention_dq", "flash_attention_dkv"):
    assert any(kernel.startswith(name) for kernel in kernels), kernels


@pytest.mark.parametrize("impl,flash", [("pallas", True), ("xla", False), ("pallas", False)],
                         ids=["pallas", "xla", "pallas_traced_window"])
def test_decoder_attention_runs_the_ring_with_the_kernel_for_pallas(inputs, impl, flash):
  """attention_ops.attention, the decoder's one call, on a sequence-sharded mesh: the ring's chunk
  pairs take the flash kernel under attention_impl='pallas' with a static window, jnp otherwise."""
  q, k, v, seg = inputs
  window = 0 if flash or impl == "xla" else jnp.asarray(8)
  mesh = sharding.make_mesh({"sequence": 2}, jax.devices()[:2])

  def attend(q, k, v, seg):
    with sharding.axis_rules(mesh):
      out, _ = attention_ops.attention(q, k, v, positions=None, segment_ids=seg, impl=impl, scale=H**-0.5,
                                       sliding_window=window)
      return out

  eqns = list(_equations(jax.make_jaxpr(attend)(q, k, v, seg).jaxpr))
  assert any(eqn.primitive.name == "ppermute" for eqn in eqns)  # the ring ran
  assert any(eqn.primitive.name == "pallas_call" for eqn in eqns) == flash


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_shifted_sparse_attention_runs_each_half_on_the_ring(inputs, impl):
  """LongLoRA's S^2-Attn on a sequence-sharded mesh: both halves of the heads go round the ring (jnp
  or flash blocks), forward and gradients equal to S^2-Attn on one device (impl='xla')."""
  mesh = sharding.make_mesh({"sequence": 4}, jax.devices()[:4])
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))

  def s2(q, k, v, seg, impl):
    return attention_ops.shifted_sparse_attention(q, k, v, group=16, positions=positions, segment_ids=seg, impl=impl,
                                                  scale=H**-0.5, sliding_window=0, logit_softcap=0.0)

  def ring(q, k, v, seg):
    with sharding.axis_rules(mesh):
      q = sharding.shard(q, attention_ops.BTNH)
      k, v = (sharding.shard(x, attention_ops.BTKH) for x in (k, v))
      return s2(q, k, v, seg, impl)

  reference = lambda q, k, v, seg: s2(q, k, v, seg, "xla")  # noqa: E731
  placed = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec()))
  eqns = list(_equations(jax.make_jaxpr(ring)(*placed).jaxpr))
  assert sum(eqn.primitive.name == "ppermute" for eqn in eqns) >= 2  # the ring ran, for each half
  np.testing.assert_allclose(jax.jit(ring)(*placed), jax.jit(reference)(*inputs), atol=1e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(_loss(ring), argnums=(0, 1, 2)))(*placed)
  expected = jax.jit(jax.grad(_loss(reference), argnums=(0, 1, 2)))(*inputs)
  for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("mesh_sizes,window", [({"sequence": 4, "tensor": 2}, 0), ({"sequence": 8}, 10)])
def test_alibi_matches_single_device_attention(inputs, mesh_sizes, window):
  """ALiBi's bias on the ring (jnp blocks; heads split over 'tensor' take their own slopes)
  against single-device attention, forward and gradients, with segments."""
  slopes = np.linspace(0.5, 0.1, N)
  mesh = sharding.make_mesh(mesh_sizes)

  def reference(q, k, v, seg):
    return attention_ops.dot_product_attention(q, k, v, impl="xla", q_segment_ids=seg, kv_segment_ids=seg,
                                               sliding_window=window, alibi_slopes=slopes)

  def ring(q, k, v, seg):  # through the decoder's dispatcher: impl='pallas' must fall back to jnp blocks
    with sharding.axis_rules(mesh):
      q = sharding.shard(q, attention_ops.BTNH)
      k, v = (sharding.shard(x, attention_ops.BTKH) for x in (k, v))
      out, _ = attention_ops.attention(q, k, v, positions=None, segment_ids=seg, impl="pallas", scale=H**-0.5,
                                       sliding_window=window, alibi_slopes=slopes)
      return out

  placed = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec()))
  eqns = list(_equations(jax.make_jaxpr(ring)(*placed).jaxpr))
  assert any(eqn.primitive.name == "ppermute" for eqn in eqns)  # the ring ran
  np.testing.assert_allclose(jax.jit(ring)(*placed), jax.jit(reference)(*inputs), atol=1e-5, rtol=1e-5)
  grads = jax.jit(jax.grad(_loss(ring), argnums=(0, 1, 2)))(*placed)
  expected = jax.jit(jax.grad(_loss(reference), argnums=(0, 1, 2)))(*inputs)
  for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="takes no ALiBi"):
    ring_attention.ring_attention(*inputs[:3], mesh=mesh, block_impl="pallas", alibi_slopes=slopes)
  with pytest.raises(ValueError, match=r"alibi_slopes has shape \(3,\)"):
    ring_attention.ring_attention(*inputs[:3], mesh=mesh, alibi_slopes=slopes[:3])


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
  with pytest.raises(ValueError, match="block_impl='flash'"):
    ring_attention.ring_attention(q, k, v, mesh=mesh, block_impl="flash")
  with pytest.raises(ValueError, match="static"):
    ring_attention.ring_attention(q, k, v, mesh=mesh, block_impl="pallas", sliding_window=jnp.asarray(8))


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
