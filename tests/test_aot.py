"""Ahead-of-time compilation for real TPU slices on this CPU (libtpu's compiler, no TPU attached):
the 8B config compiles for its slice and fits, with every weight matrix and Adam moment split over
fsdp; an oversized config reports its shortfall; a 2-host slice compiles; bad names are clear
errors. The report's parsers are checked on hand-written compiler output."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flax import nnx

from configs import common, validation
from configs.pretrain import llama3_8b
from infer import aot as infer_aot
from train import trainer
from train.aot import abstract, compile as compile_lib, jobs, report, topology

ROOT = Path(__file__).resolve().parent.parent
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler here")


@pytest.mark.parametrize("name, chips, layout, hosts", [
    ("v4-8", 4, "2x2x1", 1), ("v5e-16", 16, "4x4", 4), ("v5litepod-8", 8, "2x4", 1), ("v5p-128", 64, "4x4x4", 16),
    ("v5p-16", 8, "2x2x2", 2), ("v6e-256", 256, "16x16", 64),
])
def test_accelerator_type_names_give_their_chips(name, chips, layout, hosts):
  t = topology.parse(name)
  assert (t.num_chips, t.layout, t.num_hosts) == (chips, layout, hosts)


@pytest.mark.parametrize("name", ["v5p-7", "h100-8", "v5e-3", "v7x-8"])
def test_a_slice_that_does_not_exist_is_an_error_naming_it(name):
  config = _tiny_config()
  with pytest.raises(validation.ConfigError, match=f"--topology='{name}'"):
    jobs.run(config, name)


def test_collectives_are_read_from_optimized_hlo():
  hlo = """
  %all-gather-start = (bf16[4,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(bf16[4,128]{1,0} %p), dimensions={0}
  %all-gather-done = bf16[32,128]{1,0} all-gather-done((bf16[4,128]{1,0}, bf16[32,128]{1,0}) %all-gather-start)
  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %x), to_apply=%add
  %all-reduce.2 = (f32[2]{0}, s32[3]{0}) all-reduce(f32[2]{0} %a, s32[3]{0} %b), to_apply=%add
  %reduce-scatter = f32[8,16]{1,0} reduce-scatter(f32[64,16]{1,0} %g), dimensions={0}
  %not-a-collective = f32[8]{0} add(f32[8]{0} %a, f32[8]{0} %b)
  """
  assert report.collectives(hlo) == {
      "all-gather": {"count": 1, "bytes": 32 * 128 * 2},
      "all-reduce": {"count": 2, "bytes": 1024 * 4 + 2 * 4 + 3 * 4},
      "reduce-scatter": {"count": 1, "bytes": 8 * 16 * 4},
  }


def test_the_compilers_out_of_memory_refusal_is_read():
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
             "for HLO temporaries (120.60G) exceeds available HBM (95.73G). HLO module: jit_train_step.")
  assert report.hbm_oom_temporaries(message) == int(120.60 * (1 << 30))
  assert report.hbm_oom_temporaries("INTERNAL: something else") is None


def _tiny_config(**overrides):
  config = common.train_config()
  config.model = common.model_config("tiny", vocab_size=512, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                     head_dim=32, mlp_dim=256, dtype="bfloat16", attention_impl="pallas")
  config.batch_size, config.seq_len = 8, 256
  config.mesh = common.mesh_config(data=1, fsdp=-1)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def llama3_8b_on_v5p():
  """(report, compiled program, abstract run) of configs/pretrain/llama3_8b.py on its slice."""
  config = llama3_8b.get_config()
  t = topology.parse(config.topology)
  program, run = compile_lib.train_program(config, topology.devices(t))
  compiled = compile_lib.compile_program(program, run.mesh, run.rules)
  return compile_lib.measure("train", t, run.mesh, [compiled]), compiled, run


@needs_libtpu
def test_the_8b_config_compiles_for_its_slice_and_fits(llama3_8b_on_v5p):
  result, _, _ = llama3_8b_on_v5p
  print(report.to_text(result))
  assert (result.topology, result.num_devices, result.mesh["fsdp"]) == ("v5p-64", 32, 32)
  assert result.fits and 0 < result.hbm_per_device_bytes <= 95 * (1 << 30)
  # Parameters and Adam's two moments, fp32, split 32 ways: 8.03e9 * 12 / 32 bytes, within 1%.
  resident = result.memory["parameters"] + result.memory["optimizer state"]
  assert resident == pytest.approx(8.03e9 * 12 / 32, rel=0.01)
  assert result.memory["temporaries"] > 0
  assert result.flops_per_step > 0 and 0 < result.estimated_mfu < 1
  assert result.collectives["all-gather"]["count"] > 0  # fsdp gathers each layer's weights


@needs_libtpu
def test_no_weight_or_moment_is_replicated_across_fsdp(llama3_8b_on_v5p):
  _, compiled, run = llama3_8b_on_v5p
  assert compile_lib.fsdp_replicated_params(compiled.compiled, run) == []


@needs_libtpu
def test_an_oversized_config_reports_its_shortfall_without_crashing():
  config = _tiny_config(batch_size=64, seq_len=4096, **{"model.vocab_size": 65536, "mesh.fsdp": -1})
  result = jobs.run(config, "v5e-4")
  assert not result.fits
  summary = result.to_json()
  assert summary["shortfall_bytes"] == result.hbm_per_device_bytes - 16 * (1 << 30) > 0
  assert "DOES NOT FIT" in report.to_text(result)


@needs_libtpu
def test_a_mesh_that_does_not_cover_the_slice_is_an_error_naming_the_key():
  config = _tiny_config(**{"mesh.fsdp": 3, "mesh.data": 1})
  with pytest.raises(validation.ConfigError, match="config.mesh"):
    jobs.run(config, "v5e-4")


@needs_libtpu
def test_python_m_train_aot_on_a_two_host_slice_writes_the_json(tmp_path):
  out = tmp_path / "report.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "-m", "train.aot", "--config=configs/pretrain/quickstart.py", "--topology=v5p-16",
       "--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.model.attention_impl=pallas",
       "--config.model.vocab_size=4096", f"--json={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "v5p-16" in done.stdout and "fits" in done.stdout
  summary = json.loads(out.read_text())
  for key in ("topology", "num_devices", "hbm_per_device_bytes", "hbm_capacity_bytes", "fits", "flops_per_step",
              "estimated_step_seconds", "estimated_mfu", "compile_seconds"):
    assert key in summary, key
  assert (summary["num_devices"], summary["num_hosts"], summary["mesh"]["data"]) == (8, 2, 2)
  assert summary["fits"] and summary["compile_seconds"] > 0


@needs_libtpu
def test_decode_compiles_prefill_and_a_decode_step_with_the_cache_in_memory():
  config = _tiny_config(batch_size=16, seq_len=512)
  t, devices = jobs.slice_devices(config, "v5e-4")
  mesh, rules = trainer.mesh_and_rules(config, devices)
  model_config, make = abstract.decoder_factory(config)
  graphdef, params = nnx.split(abstract.abstract_module(make, mesh, rules))
  programs = infer_aot.decode_programs(graphdef, params, model_config, mesh, rules, batch_size=16, prompt_len=512,
                                       max_new_tokens=64)
  result = jobs.compile_programs("decode", t, mesh, rules, programs)
  assert result.programs == ["prefill", "decode step"] and result.fits
  # The decode step holds the KV cache: [L, B, K, S, H] keys and values, bf16, split over the batch.
  cache_bytes = 2 * 2 * 16 * (512 + 64) * 2 * 32 * 2 // 4
  assert result.program_memory["decode step"]["KV cache and decode state"] >= cache_bytes
  assert result.hbm_per_device_bytes == max(sum(m.values()) for m in result.program_memory.values())
  assert result.estimated_step_seconds > 0 and result.tokens_per_step == 16 * 512 + 16


@needs_libtpu
def test_grpo_compiles_its_train_step_and_rollout_with_the_state_resident():
  from align import aot as align_aot, run as align_run  # noqa: PLC0415 (tests may reach align)
  from configs.align.common import align_config  # noqa: PLC0415

  config = align_config("grpo")
  config.model = _tiny_config().model
  config.batch_size, config.seq_len, config.grad_accum_steps = 16, 128, 2
  config.mesh = common.mesh_config(data=1, fsdp=-1)
  config.task.name = "arithmetic"
  config.rl.prompts_per_iteration, config.rl.samples_per_prompt, config.rl.max_new_tokens = 4, 4, 64
  config.grpo.kl_coef = 0.05  # a frozen reference beside the policy
  config.init_from = "unused/by/aot"
  t, devices = jobs.slice_devices(config, "v5e-4", validate=align_run.validate)
  programs, run = align_aot.programs(config, devices)
  result = jobs.compile_programs("grpo", t, run.mesh, run.rules, programs)
  assert result.programs == ["train step", "rollout prefill", "rollout decode step"] and result.fits
  frozen = report.shard_bytes(run.rest)
  assert frozen == report.shard_bytes(run.state["params"]) > 0  # the reference: a copy of the policy's weights
  decode = result.program_memory["rollout decode step"]
  assert decode["frozen weights (resident)"] == frozen and decode["optimizer state (resident)"] > 0
  assert result.tokens_per_step == 16 * 128 + 16 * 64 + 16 * 64  # train rows, prompts, a token per row per step
  # Each program's time is its own (a decode step is priced as itself, not at the train step's rate).
  assert list(result.program_seconds) == result.programs and all(s > 0 for s in result.program_seconds.values())
  assert result.estimated_step_seconds == pytest.approx(sum(result.program_seconds.values()))
