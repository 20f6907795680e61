"""The jobs `python -m train.aot` compiles, importable from a notebook: `jobs.run(config, "v5p-64")`.

A job is a list of programs (train/aot/compile.py); `run` compiles the trainer's train step. The
entry point adds the jobs of the layers above this one (`--job=decode`: infer/aot.py;
`--job=grpo`: align/aot.py), which it
builds on `slice_devices` and `abstract.abstract_module` and measures with `compile_programs`.
"""

from configs import validation
from train import trainer
from train.aot import compile as compile_lib, report, topology as topology_lib

JOBS = ("train", "decode", "grpo")


def slice_devices(config, topology_name: str = "", validate=trainer.validate) -> tuple[topology_lib.Topology, list]:
  """The slice named `topology_name` (default config.topology) and its compile-only devices, after
  `validate(config)` (a method's own checks for its configs); a name that is not a slice, or none
  at all, is a ConfigError naming it."""
  topology_name = topology_name or config.get("topology", "")
  if not topology_name:
    raise validation.ConfigError("no topology: give --topology=v5p-64 (or set config.topology)")
  try:
    topology = topology_lib.parse(topology_name)
  except ValueError as e:
    raise validation.ConfigError(str(e)) from None
  validate(config)
  return topology, topology_lib.devices(topology)


def compile_programs(job: str, topology, mesh, rules, programs) -> report.Report:
  return compile_lib.measure(job, topology, mesh, [compile_lib.compile_program(p, mesh, rules) for p in programs])


def run(config, topology_name: str = "") -> report.Report:
  """The report of the trainer's train step for `config` on the slice `topology_name` (default config.topology)."""
  topology, devices = slice_devices(config, topology_name)
  program, abstract_run = compile_lib.train_program(config, devices)
  return compile_programs("train", topology, abstract_run.mesh, abstract_run.rules, [program])
