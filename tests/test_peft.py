"""Adapters (model/peft.py, model/adapters.py) against dense numpy references.

Each adapted module is checked against a plain module whose projection weights are replaced by the
method's closed form (LoRA W + s A B, DoRA m (W + s A B) / ||W + s A B||, VeRA W + (A d)(B b),
QA-LoRA W_q + s pool^T A B), computed in float64 numpy from the adapter's own factors.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model as model_lib
from model import adapters, peft, projections, quant

CONFIG = model_lib.get_preset("tiny", dtype="float32", param_dtype="float32", embed_dim=32, num_heads=2,
                              num_kv_heads=1, head_dim=16, mlp_dim=64, vocab_size=64)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
RANK = 4
ALL = "all"


_jitted_logits = jax.jit(lambda state, tokens, graphdef: nnx.merge(graphdef, state)(tokens), static_argnums=2)


def _logits(module) -> np.ndarray:
  """module(TOKENS), compiled once per module structure (eager nnx calls dispatch op by op)."""
  graphdef, state = nnx.split(module)
  return np.asarray(_jitted_logits(state, TOKENS, graphdef))


def _base(scan: bool) -> model_lib.Transformer:
  return model_lib.Transformer(CONFIG.replace(scan_layers=scan), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module", params=[False, True], ids=["layers", "scanned"])
def base(request):
  module = _base(request.param)
  return module, _logits(module)


def _adapted(base_module, **peft_config):
  module = projections.shallow_copy(base_module)
  return peft.add_adapters(module, {"targets": ALL, "rank": RANK, **peft_config}, rngs=nnx.Rngs(1))


def _perturb(module, seed=3):
  """Nonzero adapter weights (B starts at zero), so the update is not trivially zero."""
  rng = np.random.default_rng(seed)
  state = nnx.state(module, peft.is_adapter_param)
  nnx.update(module, jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), state))
  return module


_dequantize = jax.jit(quant.dequantize)  # one compile per scheme and shape, not one per op
_dense = nnx.jit(lambda weight: weight.dense(jnp.float32))


def _per_layer(x, stacked, layer):
  return np.asarray(x[layer] if stacked else x, np.float64)


def _dense_reference(adapter: adapters.Adapter, layer: int) -> np.ndarray:
  """One layer's effective weight from the adapter's factors, in float64 numpy."""
  stacked, r = adapter.stacked, adapter.in_rank
  if isinstance(adapter.base, quant.QuantizedWeight):
    q = adapter.base.quantized()
    if stacked:
      q = jax.tree.map(lambda x: x[layer], q)
    w = np.asarray(_dequantize(q), np.float64).reshape(adapter.base.shape)
  else:
    w = _per_layer(adapter.base[...], stacked, layer)
  fan_in = math.prod(w.shape[:r])
  w2 = w.reshape(fan_in, -1)
  if isinstance(adapter, adapters.VeRA):
    a, b = (np.asarray(x, np.float64) for x in adapter.projections())
    d, bv = _per_layer(adapter.vera_d[...], stacked, layer), _per_layer(adapter.vera_b[...], stacked, layer)
    delta = (a.reshape(fan_in, -1) * d) @ (b.reshape(b.shape[0], -1) * bv.reshape(-1))
    return (w2 + delta).reshape(w.shape)
  a, b = _per_layer(adapter.lora_a[...], stacked, layer), _per_layer(adapter.lora_b[...], stacked, layer)
  if isinstance(adapter, adapters.QALoRA):
    # pool^T A: each input feature reads its group's row of A, divided by the group size
    a = np.repeat(a, adapter.group_size, axis=0) / adapter.group_size
  delta = adapter.scale * a.reshape(fan_in, -1) @ b.reshape(b.shape[0], -1)
  merged = w2 + delta
  if getattr(adapter, "use_dora", False):
    m = _per_layer(adapter.lora_magnitude[...], stacked, layer).reshape(-1)
    merged = merged * m / np.linalg.norm(merged, axis=0)
  return merged.reshape(w.shape)


def _reference_module(base_module, adapted):
  """The float base with every adapted projection replaced by its dense reference weight."""
  reference = projections.shallow_copy(base_module)
  for slot, adapted_slot in zip(projections.slots(reference), projections.slots(adapted), strict=True):
    adapter = adapted_slot.get()
    if isinstance(adapter, adapters.Adapter):
      layers = range(adapter.num_layers) if adapter.stacked else [adapted_slot.layer]
      dense = np.stack([_dense_reference(adapter, i) for i in layers]) if adapter.stacked else \
          _dense_reference(adapter, adapted_slot.layer)
    elif isinstance(adapter, quant.QuantizedWeight):
      dense = np.asarray(_dense(adapter))
    else:
      continue
    slot.get().set_value(jnp.asarray(dense, jnp.float32))
  return reference


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_fresh_adapters_give_the_base_logits_exactly(base, method):
  module, logits = base
  adapted = _adapted(module, method=method)
  np.testing.assert_array_equal(_logits(adapted), np.asarray(logits))
  np.testing.assert_array_equal(_logits(module), np.asarray(logits))  # the base is untouched


@pytest.mark.parametrize("method,extra", [("lora", {}), ("lora", {"use_rslora": True, "alpha": 8.0}),
                                          ("dora", {}), ("vera", {}), ("qlora", {"block_size": 16}),
                                          ("qa_lora", {"group_size": 16})])
def test_adapted_logits_match_the_dense_reference_and_merge(base, method, extra):
  module, base_logits = base
  adapted = _perturb(_adapted(module, method=method, **extra))
  logits = _logits(adapted)
  assert np.abs(logits - np.asarray(base_logits)).max() > 1e-3  # the update is not trivial
  reference = _logits(_reference_module(module, adapted))
  np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-5)
  merged = peft.merge(adapted)
  assert not peft.has_adapters(merged) and peft.has_adapters(adapted)
  np.testing.assert_allclose(_logits(merged), logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(_logits(adapted), logits)  # merging leaves the input as it was
  if method == "qa_lora":  # still exactly int4: the same codes, only the zero points moved
    for before, after in zip(projections.slots(adapted), projections.slots(merged), strict=True):
      assert isinstance(after.get(), quant.QuantizedWeight) and after.get().scheme == "int4"
      np.testing.assert_array_equal(np.asarray(after.get().codes[...]), np.asarray(before.get().base.codes[...]))
  elif method == "qlora":
    assert not quant.is_quantized(merged)


def test_rslora_scale():
  lora = peft.settings({"method": "lora", "rank": 16, "alpha": 32})
  rs = peft.settings({"method": "lora", "rank": 16, "alpha": 32, "use_rslora": True})
  assert lora.scale == 2.0 and rs.scale == 8.0


def _closed_form_count(method, targets, group_size=32):
  c = CONFIG
  d, n, k, h, f = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  fans = {"q_proj": (d, n * h), "k_proj": (d, k * h), "v_proj": (d, k * h), "o_proj": (n * h, d),
          "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
  per_layer = 0
  for name in targets:
    fan_in, fan_out = fans[name]
    per_layer += {"lora": RANK * (fan_in + fan_out), "qlora": RANK * (fan_in + fan_out),
                  "dora": RANK * (fan_in + fan_out) + fan_out, "vera": RANK + fan_out,
                  "qa_lora": RANK * (fan_in // group_size + fan_out)}[method]
  return per_layer * c.num_layers


@pytest.mark.parametrize("method", ["lora", "dora", "vera", "qlora", "qa_lora"])
@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all"])
def test_trainable_counts_are_the_closed_form(method, targets):
  module = nnx.eval_shape(lambda: peft.add_adapters(
      _base(True), {"method": method, "targets": targets, "rank": RANK, "block_size": 16, "group_size": 16},
      rngs=nnx.Rngs(0)))
  names = list(projections.PROJECTIONS) if targets == "all" else targets.split(",")
  assert peft.trainable_count(module) == _closed_form_count(method, names, group_size=16)


def test_vera_projections_are_shared_and_not_state():
  module = _adapted(_base(False), method="vera")
  first, second = module.layers[0].attn.wq, module.layers[1].attn.wq
  for x, y in zip(first.projections(), second.projections()):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A smaller weight takes a slice of the same pair (PEFT's sharing across shapes).
  a_q, _ = first.projections()
  a_k, b_k = module.layers[0].attn.wk.projections()
  np.testing.assert_array_equal(np.asarray(a_q), np.asarray(a_k))
  assert b_k.shape == (RANK, CONFIG.num_kv_heads, CONFIG.head_dim)
  # Only d and b are state: nothing of A's or B's size is stored anywhere in the module.
  names = {str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(module))}
  assert {"vera_d", "vera_b"} <= names and not names & {"vera_A", "vera_B", "lora_a", "lora_b"}
  again = _adapted(_base(False), method="vera")  # regenerated from the seed
  np.testing.assert_array_equal(np.asarray(again.layers[1].mlp.w_up.projections()[0]),
                                np.asarray(module.layers[1].mlp.w_up.projections()[0]))


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_qlora_base_is_nf4_with_double_quant_at_about_4_and_a_half_bits():
  module = _adapted(_base(True), method="qlora", block_size=16)
  weights = [slot.get().base if isinstance(slot.get(), adapters.Adapter) else slot.get()
             for slot in projections.slots(module)]
  assert all(isinstance(w, quant.QuantizedWeight) and w.scheme == "nf4" for w in weights)
  assert all(w.quantized().double_quant for w in weights)
  for w in weights:  # per layer: packed 4-bit codes, 8-bit absmax per block of 16, a float per 256 of those
    n = math.prod(w.shape)
    padded = -(-n // 16 // 256) * 256
    expected = n // 2 + padded + 4 * padded // 256 + 4
    assert _bytes(nnx.state(w)) == CONFIG.num_layers * expected
  # At Llama 3.1 8B's MLP size with QLoRA's block of 64: 4 + 8/64 + 32/(64*256) bits per parameter.
  big = jax.eval_shape(lambda x: quant.quantize_array(x, "nf4", block_size=64, double_quant=True),
                       jax.ShapeDtypeStruct((4096, 14336), jnp.bfloat16))
  bits = 8 * _bytes(big) / (4096 * 14336)
  assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3, bits


def test_without_adapters_is_the_base_and_leaves_the_module_adapted(base):
  module, logits = base
  adapted = _perturb(_adapted(module, method="dora"))
  before = _logits(adapted)
  np.testing.assert_array_equal(_logits(peft.without_adapters(adapted)), np.asarray(logits))
  np.testing.assert_array_equal(_logits(adapted), before)


def test_dropout_is_off_unless_a_step_turns_it_on():
  base_module = _base(True)
  adapted = _perturb(_adapted(base_module, method="lora", dropout=0.5))
  plain = _perturb(_adapted(base_module, method="lora"))
  np.testing.assert_array_equal(_logits(adapted), _logits(plain))

  graphdef, state = nnx.split(adapted)
  step_logits = jax.jit(lambda state, rng: peft.with_dropout(nnx.merge(graphdef, state), rng)(TOKENS))
  step_logits = functools.partial(step_logits, state)

  first, again = step_logits(jax.random.PRNGKey(0)), step_logits(jax.random.PRNGKey(0))
  other = step_logits(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert np.abs(np.asarray(first) - _logits(plain)).max() > 1e-4
  assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-4


def test_bad_configs_name_the_key():
  module = _base(False)
  with pytest.raises(ValueError, match="valid names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"):
    _adapted(module, method="lora", targets="q_proj,query")
  with pytest.raises(ValueError, match="config.peft.rank=0"):
    _adapted(module, method="lora", rank=0)
  with pytest.raises(ValueError, match="config.peft.group_size=24 does not divide the 32 input features"):
    _adapted(module, method="qa_lora", group_size=24)
  with pytest.raises(ValueError, match="config.peft.method='lokr'"):
    _adapted(module, method="lokr")
  with pytest.raises(ValueError, match="quant_bits=8 does not match"):
    _adapted(module, method="qlora", quant_bits=8)
  with pytest.raises(ValueError, match="unknown key"):
    _adapted(module, method="lora", lora_rank=4)
  quantized = quant.quantize(module, "int8")
  with pytest.raises(ValueError, match="already quantized"):
    _adapted(quantized, method="qlora", block_size=16)
  with pytest.raises(ValueError, match="already has adapters"):
    peft.add_adapters(_adapted(module, method="lora"), {"method": "lora"}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("method", ["qlora"])
def test_a_train_step_changes_only_the_adapters(method):
  """train.step's own step (the trainer's) on the adapter parameters: every adapter weight moves,
  the base (float, or NF4 codes and scales) stays bitwise as it was; dropout on."""
  import optax
  from train import step as step_lib
  module = _adapted(_base(True), method=method, block_size=16, dropout=0.1)
  graphdef, trained, rest = nnx.split(module, peft.is_adapter_param, ...)

  def loss_fn(model, batch, rng, *, whole_batch=None):
    del rng, whole_batch
    logits = model(batch["tokens"])
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][..., None], -1))
    return loss, {"tokens": jnp.asarray(batch["tokens"].size, jnp.float32)}

  optimizer = optax.adam(1e-2)
  step = jax.jit(step_lib.make_train_step(graphdef, loss_fn, optimizer, optax.constant_schedule(1e-2)))
  state = step_lib.init_state(trained, optimizer, seed=0)
  assert {x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim} <= {x.shape for x in jax.tree.leaves(trained)}
  new_state, _ = step(state, rest, {"tokens": TOKENS})
  # B starts at zero, so A's first gradient is zero (LoRA's init); after a second step all move.
  new_state, _ = step(new_state, rest, {"tokens": TOKENS})
  for before, after in zip(jax.tree.leaves(trained), jax.tree.leaves(new_state["params"]), strict=True):
    assert not np.array_equal(np.asarray(before), np.asarray(after))
  frozen = nnx.state(module, nnx.Not(peft.is_adapter_param))
  for before, after in zip(jax.tree.leaves(frozen), jax.tree.leaves(rest), strict=True):
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_the_backward_pass_keeps_no_float_copy_of_the_base(method, capsys):
  """The base's float (dequantized or cast) weights are recomputed in the backward pass, not saved
  from the forward: no residual other than an argument has a projection weight's element count."""
  from jax import ad_checkpoint
  config = CONFIG.replace(scan_layers=True, param_dtype="bfloat16")
  module = _adapted(model_lib.Transformer(config, rngs=nnx.Rngs(0)), method=method, block_size=16)
  graphdef, trained, rest = nnx.split(module, peft.is_adapter_param, ...)
  ad_checkpoint.print_saved_residuals(lambda p, r: nnx.merge(graphdef, p, r)(TOKENS).sum(), trained, rest)
  saved = [line for line in capsys.readouterr().out.splitlines() if "from the argument" not in line]
  shapes = {(config.num_layers, *slot.get().base.shape) for slot in projections.slots(module)}
  shapes |= {(config.num_layers, math.prod(s[1:1 + slot.in_rank]), *s[1 + slot.in_rank:])
             for slot in projections.slots(module) for s in [(0, *slot.get().base.shape)]}
  shapes |= {(config.embed_dim, config.vocab_size), (config.vocab_size, config.embed_dim)}
  assert saved
  for line in saved:
    text = line.split("[", 1)[1].split("]", 1)[0]
    shape = tuple(int(d) for d in text.split(",") if d)
    assert shape not in shapes, line


def test_qlora_with_a_quantized_head_and_merging_to_a_plain_module():
  """quant_head: the untied output head is NF4 too, decoded as the reference decodes it; merging a
  QLoRA module (adapters on two projections only) gives a module with no quantized weight left."""
  module = _base(True)
  adapted = _perturb(_adapted(module, method="qlora", block_size=16, quant_head=True, targets="q_proj,v_proj"))
  assert isinstance(adapted.lm_head, quant.QuantizedWeight) and adapted.lm_head.scheme == "nf4"
  reference = _reference_module(module, adapted)
  reference.lm_head.set_value(jnp.asarray(np.asarray(adapted.lm_head.dense(jnp.float32))))
  logits = _logits(adapted)
  np.testing.assert_allclose(logits, _logits(reference), atol=2e-5, rtol=1e-5)
  merged = peft.merge(adapted)
  assert not quant.is_quantized(merged) and not peft.has_adapters(merged)
  np.testing.assert_allclose(_logits(merged), logits, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="tie_embeddings=True"):
    tied = model_lib.Transformer(CONFIG.replace(tie_embeddings=True), rngs=nnx.Rngs(0))
    _adapted(tied, method="qlora", block_size=16, quant_head=True)
