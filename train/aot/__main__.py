"""python -m train.aot --config=configs/pretrain/FILE.py --topology=v5p-64 [--job=train] [--json=FILE]

Compiles the config's real jitted step for a Cloud TPU slice on this machine (libtpu's compiler,
no TPU attached: `pip install -e '.[tpu]'`), allocating nothing, and prints per chip: the HBM it
needs by category against the chip's, whether it fits and by how much, flops per step and per
token, XLA's estimated step time and the MFU it implies (estimates, not measurements), compile
time and the collectives in the program. `--config.KEY=VALUE` overrides as for `python -m train`;
config.mesh is laid over the slice's chips (its axes must multiply to their number).

Jobs: train (the trainer's train step); decode (infer.generate's prefill of config.batch_size
prompts of config.seq_len tokens and one decode step, `--new_tokens` the room in the KV cache);
grpo (a GRPO config's train step, and its rollout's prefill and decode step with the train state
resident: configs/align/grpo_llama3_8b.py).
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; libtpu is used to compile only

from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from align import aot as align_aot, run as align_run  # noqa: E402
from configs import cli, validation  # noqa: E402
from infer import aot as infer_aot  # noqa: E402
from rundir.loading import write_json_atomic  # noqa: E402
from train import trainer  # noqa: E402
from train.aot import abstract, jobs, report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/...py[:arg]).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "Cloud TPU accelerator type: v4-8, v5e-16, v5p-128, v6e-256, ... "
                                "(default: the config's own, config.topology)")
_JOB = flags.DEFINE_enum("job", "train", jobs.JOBS, "Which program(s) to compile.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 256, "--job=decode: the tokens each row may generate "
                                   "(the KV cache holds config.seq_len + this many, rounded up)")
_JSON = flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config"])


def decode_report(config, topology_name: str, new_tokens: int) -> report.Report:
  """Prefill of config.batch_size prompts of config.seq_len tokens, and one decode step after it."""
  topology, devices = jobs.slice_devices(config, topology_name)
  mesh, rules = trainer.mesh_and_rules(config, devices)
  model_config, make_decoder = abstract.decoder_factory(config)
  graphdef, params = nnx.split(abstract.abstract_module(make_decoder, mesh, rules))
  programs = infer_aot.decode_programs(graphdef, params, model_config, mesh, rules, batch_size=config.batch_size,
                                       prompt_len=config.seq_len, max_new_tokens=new_tokens)
  return jobs.compile_programs("decode", topology, mesh, rules, programs)


def grpo_report(config, topology_name: str) -> report.Report:
  """GRPO's train step and its rollout's prefill and decode step (align/aot.py); config: a GRPO config."""
  if config.get("method") != "grpo":
    raise validation.ConfigError(f"--job=grpo needs a GRPO config (configs/align/...), but config.method is "
                                 f"{config.get('method')!r}")
  topology, devices = jobs.slice_devices(config, topology_name, validate=align_run.validate)
  programs, run = align_aot.programs(config, devices)
  return jobs.compile_programs("grpo", topology, run.mesh, run.rules, programs)


def main(argv):
  if len(argv) > 1:
    raise validation.ConfigError(f"unexpected arguments: {argv[1:]}")
  if _JOB.value == "decode":
    result = decode_report(_CONFIG.value, _TOPOLOGY.value, _NEW_TOKENS.value)
  elif _JOB.value == "grpo":
    result = grpo_report(_CONFIG.value, _TOPOLOGY.value)
  else:
    result = jobs.run(_CONFIG.value, _TOPOLOGY.value)
  print(report.to_text(result), flush=True)
  if _JSON.value:
    write_json_atomic(Path(_JSON.value), result.to_json())


if __name__ == "__main__":
  cli.run(main)
