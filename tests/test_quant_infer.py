"""Weight-only quantized decoders (model.quant.quantize) in `infer.generate` and `python -m infer`.

The reference for a quantized module is the float module whose seven projection weights are
replaced by dequantize(quantize(W)) computed here in numpy from the definitions (absmax / 127,
(max - min) / 15 with the minimum as zero point, block absmax times the nearest NF4 value by an
argmin over all 16, QLoRA's double quantization of the absmax constants), not through
model/quant.py; its logits must equal the quantized module's to 1e-5, with and without scanned
layers, in a full forward pass and through the KV cache. The error against float32 is measured
on the same random-init model, where int8's step is ~1/13 of int4's and NF4's at a block of 32.
"""

import functools
import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infer
import rundir
from configs import cli as configs_cli
from configs import validation
from configs.infer import generate as generate_config
from infer import cli
from model import hf, projections, quant, sharding
from rundir import tokenizer as tokenizer_lib

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "hf" / "llama"  # D=64, N=4, K=2, H=16, F=128, L=2, V=128
BLOCK = 32  # two blocks / groups per input column of the D=64 weights, four of the F=128 one
PROMPTS = [[1, 17, 3, 99], [1, 8, 7, 6, 5, 4, 3, 2, 60]]
NEW_TOKENS = 6
LENGTH = 16  # prompt + generated tokens, right-padded: one forward shape for every check
TOKENS = np.random.default_rng(0).integers(0, 128, (len(PROMPTS), LENGTH))
# (scheme, double_quant)
VARIANTS = [("int8", False), ("int4", False), ("nf4", False), ("nf4", True)]
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)  # bitsandbytes' NF4 values (QLoRA, appendix E)


# ---------------------------------------------------------------------------------------------- references
# Scales are float32, as stored. XLA folds a division by a constant into a multiplication by its
# float32 reciprocal, so the stored scales are absmax * float32(1/127) and (max - min) * float32(1/15),
# at times one ulp from a correctly rounded division; the reference computes them so, since one ulp
# in every scale of a group moves this fixture's logits (its weights reach 1.2) by ~2e-5. Each code
# is picked from the exact quotient (float64): where a quotient lies within an ulp of a rounding
# boundary a float32 division could pick the neighbouring code (the fixture has no such weight).
def _nonzero(s):
  return np.where(s == 0, 1, s)


def _reference_scales(absmax: np.ndarray, mean: np.float32) -> np.ndarray:
  """QLoRA's double quantization of the NF4 absmax constants, as model/quant.py documents it: minus
  their mean, symmetric int8 in blocks of 256 (zero-padded), plus the mean."""
  flat = absmax.reshape(-1).astype(np.float32)
  # A float32 mean depends on the order of its sum: XLA's is a few ulp from the exact one, which
  # shifts every decoded absmax alike and moves the logits by ~1e-5. So the module's float32 mean
  # is checked against the exact mean here, to a few ulp, and then used.
  np.testing.assert_array_max_ulp(mean, np.float32(flat.astype(np.float64).mean()), maxulp=8)
  centered = np.zeros(-(-flat.size // 256) * 256, np.float32)
  centered[:flat.size] = flat - mean
  centered = centered.reshape(-1, 256)
  step = np.abs(centered).max(axis=1, keepdims=True) * np.float32(1 / 127)
  codes = np.clip(np.round(centered.astype(np.float64) / _nonzero(step)), -127, 127)
  decoded = (codes * step.astype(np.float64) + mean).astype(np.float32).reshape(-1)[:flat.size]  # one rounding
  return decoded.reshape(absmax.shape)


def reference_dequantized(w: np.ndarray, scheme: str, block_size: int, double_quant: bool = False,
                          mean: np.float32 | None = None) -> np.ndarray:
  """dequantize(quantize(w)) of a (fan_in, fan_out) float32 weight, in numpy, from the definitions
  (`mean`: the float32 mean of the NF4 absmax constants, for double_quant)."""
  w = np.asarray(w, np.float32)
  if scheme == "int8":  # symmetric, one scale per output column
    scale = np.abs(w).max(axis=0, keepdims=True) * np.float32(1 / 127)
    codes = np.clip(np.round(w.astype(np.float64) / _nonzero(scale)), -127, 127)
    return codes.astype(np.float32) * scale
  groups = w.reshape(w.shape[0] // block_size, block_size, w.shape[1])  # runs of inputs of one output
  if scheme == "int4":  # asymmetric: 16 levels from the group's minimum to its maximum
    lo, hi = groups.min(axis=1, keepdims=True), groups.max(axis=1, keepdims=True)
    scale = (hi - lo) * np.float32(1 / 15)
    codes = np.clip(np.round((groups.astype(np.float64) - lo) / _nonzero(scale)), 0, 15)
    return (lo + codes * scale.astype(np.float64)).astype(np.float32).reshape(w.shape)  # one rounding
  absmax = np.abs(groups).max(axis=1, keepdims=True)
  normed = groups.astype(np.float64) / _nonzero(absmax)
  codes = np.argmin(np.abs(normed[..., None] - NF4.astype(np.float64)), axis=-1)  # nearest of all 16
  if double_quant:
    absmax = _reference_scales(absmax, mean)
  return (NF4[codes] * absmax).reshape(w.shape)


def reference_module(float_module, scheme: str, block_size: int, double_quant: bool = False, quantized=None):
  """A copy of the float module with each projection weight (every layer's) replaced by its numpy
  reference_dequantized, the input axes flattened as model/quant.py documents (NHD as (N*H)D). With
  double_quant, the means of the absmax constants are `quantized`'s (see _reference_scales)."""
  module = projections.shallow_copy(float_module)
  quantized_slots = projections.slots(quantized) if double_quant else None
  for slot in projections.slots(module):
    param = slot.get()
    value = np.asarray(param.get_value())
    layers = value if slot.stacked else value[None]
    means = [None] * len(layers)
    if double_quant:
      means = np.asarray(next(quantized_slots).get().scale_mean.get_value()).reshape(len(layers))
    shape = layers.shape[1:]
    flat_shape = (math.prod(shape[:slot.in_rank]), math.prod(shape[slot.in_rank:]))
    new = np.stack([reference_dequantized(w.reshape(flat_shape), scheme, block_size, double_quant, mean).reshape(shape)
                    for w, mean in zip(layers, means, strict=True)])
    param.set_value(jnp.asarray(new if slot.stacked else new[0]))
  return module


# ---------------------------------------------------------------------------------------------- helpers
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def logits(module, tokens) -> np.ndarray:
  """Full-sequence logits [B, T, V]; compiled once per module structure (graphdef) and shape."""
  graphdef, state = nnx.split(module)
  return np.asarray(_forward(graphdef, state, jnp.asarray(tokens)))


def _padded(prompts, generated):
  batch = np.zeros((len(prompts), LENGTH), np.int32)
  for row, (prompt, tokens) in enumerate(zip(prompts, generated, strict=True)):
    sequence = list(prompt) + list(tokens)
    batch[row, :len(sequence)] = sequence
  return batch


@pytest.fixture(scope="module")
def models():
  """models(scan_layers) is the fixture's float module; models(scan_layers, scheme, double_quant) its
  quantized copy. Each is made once: a quantized module compiles its own forward and decode."""
  floats = {scan: hf.from_pretrained(FIXTURE, scan_layers=scan) for scan in (True, False)}
  made = {}

  def get(scan, scheme=None, double_quant=False):
    if scheme is None:
      return floats[scan]
    if (scan, scheme, double_quant) not in made:
      made[scan, scheme, double_quant] = quant.quantize(floats[scan], scheme, block_size=BLOCK,
                                                        double_quant=double_quant)
    return made[scan, scheme, double_quant]

  return get


def _cases(variants, scans):
  return [pytest.param(scan, scheme, dq, id=f"{'scan' if scan else 'unscanned'}-{scheme}{'_dq' if dq else ''}")
          for scan in scans for scheme, dq in variants]


# Every scheme with scanned layers (one QuantizedWeight per projection, a leading layer axis sliced
# by the layer scan); unscanned (one per layer and projection), int8 (codes, scale) and nf4 with
# double quantization (codes and the three arrays of the quantized absmax). Each case compiles a
# forward and a decode of its own.
CASES = _cases(VARIANTS, (True,)) + _cases([("int8", False), ("nf4", True)], (False,))


# ---------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("scan,scheme,double_quant", CASES)
def test_quantized_logits_equal_the_float_model_with_reference_weights(models, scan, scheme, double_quant):
  float_model, quantized = models(scan), models(scan, scheme, double_quant)
  layers = float_model.config.num_layers
  assert sum(isinstance(m, quant.QuantizedWeight) for _, m in nnx.iter_modules(quantized)) == (7 if scan else 7 * layers)
  assert not quant.is_quantized(float_model)  # quantize returns a copy

  got = logits(quantized, TOKENS)
  reference = logits(reference_module(float_model, scheme, BLOCK, double_quant, quantized), TOKENS)
  # float32 roundoff of two orders of the same sums: CI saw 1.2e-5 at a logit of 3.8 (3e-6 relative).
  np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5)
  # ... which is not the float model: the 1e-5 above is far below the quantization error.
  assert np.abs(got - logits(float_model, TOKENS)).max() > 1e-2


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("scan,scheme,double_quant", CASES)
def test_greedy_generation_with_the_kv_cache_follows_the_quantized_logits(models, scan, scheme, double_quant):
  quantized = models(scan, scheme, double_quant)
  out = infer.generate(quantized, PROMPTS, max_new_tokens=NEW_TOKENS)  # prefill, then one token at a time
  assert [len(t) for t in out.tokens] == [NEW_TOKENS] * len(PROMPTS)
  assert out.finish_reasons == ["length"] * len(PROMPTS)
  full = logits(quantized, _padded(PROMPTS, out.tokens))  # causal: the padding changes nothing before it
  for row, (prompt, tokens) in enumerate(zip(PROMPTS, out.tokens, strict=True)):
    steps = full[row, len(prompt) - 1: len(prompt) - 1 + len(tokens)]  # the distributions the tokens came from
    assert tokens == steps.argmax(-1).tolist()
    logprobs = jax.nn.log_softmax(steps.astype(np.float64), axis=-1)
    np.testing.assert_allclose(out.model_logprobs[row], logprobs[np.arange(len(tokens)), tokens], atol=1e-5)


# ---------------------------------------------------------------------------------------------- error vs float32
def test_logit_error_against_float32_is_bounded_and_int8_is_smallest(models):
  """On the fixture (transformers' random init; logits std ~1.7), at a block of 32 for the 4-bit schemes."""
  exact = logits(models(True), TOKENS).astype(np.float64)
  spread = exact.std()
  mean_abs, kl = {}, {}
  for scheme, double_quant in VARIANTS:
    name = scheme + ("_dq" if double_quant else "")
    approx = logits(models(True, scheme, double_quant), TOKENS).astype(np.float64)
    mean_abs[name] = np.abs(approx - exact).mean() / spread
    p, q = jax.nn.log_softmax(exact, axis=-1), jax.nn.log_softmax(approx, axis=-1)
    kl[name] = float((np.exp(p) * (p - q)).sum(-1).mean())
  # Measured: mean |error| / std of the logits int8 0.026, int4 0.35, nf4 0.31 (with double quant
  # too); KL int8 0.0017, int4 0.29, nf4 0.24 nats.
  assert 0 < mean_abs["int8"] < 0.06
  assert all(0 < mean_abs[name] < 0.6 for name in ("int4", "nf4", "nf4_dq"))
  assert 5 * mean_abs["int8"] < min(mean_abs["int4"], mean_abs["nf4"])
  assert 0 < 20 * kl["int8"] < min(kl["int4"], kl["nf4"]) and max(kl.values()) < 0.6
  # Double quantization moves each absmax by at most half an 8-bit step: the error barely changes.
  assert abs(mean_abs["nf4_dq"] - mean_abs["nf4"]) < 0.05 * mean_abs["nf4"]


# ---------------------------------------------------------------------------------------------- python -m infer
def _hf_directory(tmp_path):
  """The llama fixture with a small sentencepiece tokenizer.model (rundir.load needs one)."""
  directory = tmp_path / "llama"
  shutil.copytree(FIXTURE, directory)
  words = "the cat sat on a mat while dogs ran far away from home and birds sang in trees".split()
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, size=20)) for _ in range(100)]
  tokenizer_lib.train_tokenizer(texts, directory / "tokenizer.model", vocab_size=64, byte_fallback=False)
  return directory


def _config(checkpoint, **overrides):
  config = generate_config.get_config()
  config.checkpoint = str(checkpoint)
  config.prompt = "the cat sat"
  config.max_new_tokens = 5
  config.stop_at_eos = False
  config.update(overrides)
  return config


def test_cli_nf4_on_a_tensor_parallel_mesh_generates_as_the_quantized_module(tmp_path):
  directory = _hf_directory(tmp_path)
  config = _config(directory, quant="nf4", quant_block_size=BLOCK)  # the default mesh: tensor=8
  out = io.StringIO()
  completion = cli.run(config, out=out)

  mesh = sharding.make_mesh({"data": 1, "tensor": -1})
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
  module, tokenizer = rundir.load(directory, mesh=mesh, rules=rules)
  with sharding.axis_rules(mesh, sharding.with_default_rules(rules)):
    quantized = quant.quantize(module, "nf4", block_size=BLOCK)
  w_gate = quantized.layers.mlp.w_gate.codes.get_value()  # (L, D / 2, F) packed: F over the 8-way tensor axis
  assert w_gate.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  expected = infer.generate(quantized, [cli.encode_prompt(tokenizer, config.prompt)], max_new_tokens=5, mesh=mesh,
                            rules=rules)
  assert completion.tokens == expected.tokens[0]

  # The projections: 2 layers x (64*64 q + 2 * 64*32 k, v + 64*64 o + 3 * 64*128 gate, up, down)
  # = 73,728 weights; float32 4 bytes each; nf4 half a byte (a code) + 4 / 32 (a block's absmax).
  weights = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
  assert weights * (1 / 2 + 4 / BLOCK) == cli.projection_bytes(quantized) == 46_080 and weights * 4 == 294_912
  summary = out.getvalue().splitlines()[-1]
  assert summary.startswith("[5 tokens, reached max_new_tokens, mean log-prob per token ")
  assert summary.endswith("; weights nf4-quantized, blocks of 32: projections 45.0 KiB vs 288.0 KiB float32]")


def test_cli_quant_errors_name_the_key(tmp_path):
  for overrides, message in [
      (dict(quant="fp3"), r"config.quant='fp3' is not a quantization scheme; use one of int8, int4, nf4 or '' \(off\)"),
      (dict(quant="nf4", quant_block_size=0), "config.quant_block_size=0 must be >= 1"),
      (dict(quant="int4", quant_block_size=33), r"config.quant_block_size=33 must be even with config.quant='int4'"),
  ]:
    with pytest.raises(validation.ConfigError, match=message):
      cli.validate(_config("runs/somewhere", **overrides))
  # A block size is checked against the checkpoint's weights once it is loaded.
  with pytest.raises(validation.ConfigError,
                     match=r"config.quant_block_size=48: block_size=48 does not divide the 64 input features of q_proj"):
    cli.run(_config(_hf_directory(tmp_path), quant="int4", quant_block_size=48), out=io.StringIO())


def test_python_m_infer_rejects_an_unknown_scheme_in_one_line():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "infer", "--config=configs/infer/generate.py", "--config.checkpoint=runs/somewhere",
       "--config.quant=fp3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == configs_cli.EXIT_STATUS and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.splitlines()[-1] == (
      "error: config.quant='fp3' is not a quantization scheme; use one of int8, int4, nf4 or '' (off)")
